"""Errors of the `runtime` layer. Each message says what is wrong and what to do about it."""


class RuntimeFailure(Exception):
    """Base of every error cocon-runtime reports; the CLI prints it and exits 1."""


class ContainerNotFound(RuntimeFailure):
    """No container with that id exists under the runtime root."""


class ContainerExists(RuntimeFailure):
    """A container with that id exists already."""


class InvalidState(RuntimeFailure):
    """The operation is not allowed in the container's current state."""


class CgroupError(RuntimeFailure):
    """A cgroup could not be created, configured, or removed."""


class SeccompError(RuntimeFailure):
    """A seccomp profile could not be compiled or loaded."""


class CapabilityError(RuntimeFailure):
    """A capability set names an unknown capability or could not be applied."""
