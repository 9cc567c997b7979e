"""Errors caused by user input. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a file, a key, a value); the message names it."""


class ConfigError(UserError):
    """A configuration key is unknown, has the wrong type, or points at something that does not exist."""
