"""Errors that entry points report as a one-paragraph message instead of a traceback.

Every message names what is wrong (a config key, file, record id, line or value) and the fix;
:func:`qa_lightning.cli.report_errors` prints it and exits with status 2.
"""

from typing import Any

#: A rule that a config breaks: the key (e.g. ``data.stride``), its value and the fix.
Problem = tuple[str, Any, str]


class QAError(Exception):
    """A problem with the user's input or configuration; the message names it and the fix."""


class ConfigError(QAError):
    """A configuration value is invalid."""


def invalid_config(problem: Problem) -> ConfigError:
    """The error for a broken config rule: ``invalid config: KEY=VALUE; FIX``."""
    key, value, fix = problem
    return ConfigError(f"invalid config: {key}={value!r}; {fix}")


class DataError(QAError):
    """A data file or record is invalid."""


class InputError(QAError):
    """A question or context cannot be answered as given (e.g. it is empty)."""


class ExportError(QAError):
    """An export could not be written or does not reproduce the PyTorch model."""


class TrainingError(QAError):
    """Training cannot go on as configured (e.g. the loss became non-finite)."""


class ResourceError(QAError):
    """The machine ran out of memory or disk space; the message names the settings to change."""
