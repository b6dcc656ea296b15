"""Errors of the `oci` layer: malformed or invalid OCI documents."""


class OCIError(Exception):
    """Base of every error raised by cocon.oci; the message tells the user what to fix."""


class ConfigError(OCIError):
    """A runtime-spec config.json (or process.json) is malformed or breaks a rule of the spec."""
