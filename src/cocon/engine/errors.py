"""Errors of the `engine` layer. Each message says what is wrong and what to do about it.

`status` is the HTTP status the API will answer with (Docker's conventions): 400 bad request,
404 no such object, 409 conflict with the current state, 500 anything else.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises."""

    status = 500


class InvalidRequest(EngineError):
    """The request cannot be carried out as given (a bad flag value, a bad mount, …)."""

    status = 400


class NotFound(EngineError):
    """No container, image or volume matches."""

    status = 404


class Conflict(EngineError):
    """The object's state forbids the operation (name taken, container running, image in use, …)."""

    status = 409


class StartFailed(EngineError):
    """The container could not be started. `exit_code` is what `docker run` exits with for it:
    127 when the command does not exist, 126 when it cannot be executed, 125 otherwise."""

    def __init__(self, message: str, exit_code: int = 125) -> None:
        super().__init__(message)
        self.exit_code = exit_code
