"""The batchrun exception tree.

Every error batchrun raises on purpose derives from :class:`BatchrunError`, so a
caller can catch them all in one clause. The command line turns a
:class:`ConfigError` or :class:`UsageError` into one line and exit code 2.
"""

from __future__ import annotations


class BatchrunError(Exception):
    """Base class of every error batchrun raises on purpose."""

    __module__ = "batchrun"


class ConfigError(BatchrunError):
    """Raised when a batch configuration is invalid.

    The message names the file and the key and explains how to fix the value.
    When several problems are found at once, ``problems`` lists each of them
    and the message joins them, one per line.
    """

    __module__ = "batchrun"

    def __init__(self, message: str, *, path: str | None = None, problems: list[str] | None = None) -> None:
        super().__init__(message)
        #: The configuration file the problem was found in, if any.
        self.path = path
        #: Every problem found, each a complete one-line message.
        self.problems = problems if problems is not None else [message]


class UsageError(BatchrunError):
    """Raised when the command line is used incorrectly."""

    __module__ = "batchrun"


class PluginError(BatchrunError):
    """Raised when a plugin cannot be loaded or is written incorrectly."""

    __module__ = "batchrun"


class PoolBrokenError(BatchrunError):
    """Raised when the worker pool cannot start or replace a worker process."""

    __module__ = "batchrun"
