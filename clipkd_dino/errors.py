"""Errors caused by user input. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a file, a key, a value); the message names it."""


class ConfigError(UserError):
    """A configuration key is unknown, has the wrong type, or points at something that does not exist."""


class RunStopped(Exception):
    """A run stopped on request (SIGTERM / SIGINT) after saving what a resume needs; `code` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
