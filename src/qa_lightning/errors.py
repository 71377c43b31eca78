"""Errors that entry points report as a one-paragraph message instead of a traceback."""


class QAError(Exception):
    """A problem with the user's input or configuration; the message names it and the fix."""


class ConfigError(QAError):
    """A configuration value is invalid."""


class DataError(QAError):
    """A data file or record is invalid."""
