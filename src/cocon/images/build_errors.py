"""Errors of image builds: a Containerfile that cannot be parsed or resolved, a bad .dockerignore.

Every message says what is wrong and, where it can, what to write instead. `ContainerfileError`
renders like a compiler diagnostic, so that editors and terminals can jump to the line:

    Containerfile:12: RUN: unknown flag: mnt (did you mean mount?)
"""

from __future__ import annotations

from cocon.images.errors import ImageError

__all__ = ["BuildError", "ContainerfileError", "DockerIgnoreError", "SubstitutionError"]


class BuildError(ImageError):
    """Base of every error raised while preparing or running an image build."""


class SubstitutionError(BuildError):
    """A word could not be expanded: bad `${...}` syntax, an unterminated quote, or `${VAR?message}`.

    Raised by `containerfile.expand()`; the parser and `Containerfile.resolve()` wrap it into a
    `ContainerfileError` that names the file, line and instruction.
    """


class ContainerfileError(BuildError):
    """A Containerfile (Dockerfile) is malformed or cannot be resolved.

    `str()` is `FILE:LINE: INSTRUCTION: MESSAGE`; the line and the instruction are left out when the
    error is about the whole file (e.g. an unknown `--target`).
    """

    def __init__(self, file: str, line: int | None, instruction: str | None, message: str) -> None:
        self.file = file
        self.line = line
        self.instruction = instruction
        self.message = message
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.instruction:
            return f"{where}: {self.instruction}: {self.message}"
        return f"{where}: {self.message}"

    def __reduce__(self) -> tuple[type[ContainerfileError], tuple[str, int | None, str | None, str]]:
        return (type(self), (self.file, self.line, self.instruction, self.message))


class DockerIgnoreError(BuildError):
    """A .dockerignore pattern is malformed (e.g. a lone `!` or an unclosed `[`)."""
