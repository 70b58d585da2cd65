"""batchrun: run a batch of tasks on a bounded pool of worker processes.

The names below are the public API for task and plugin authors.
"""

from __future__ import annotations

from batchrun.errors import BatchrunError, ConfigError, PluginError, PoolBrokenError, UsageError
from batchrun.hookspecs import hookimpl, hookspec
from batchrun.models import Attempt, ErrorInfo, Outcome, RetrySettings, RunInfo, RunSummary, Task
from batchrun.worker import AttemptContext, AttemptTimeoutError, current_attempt


__version__ = "0.1.0"

__all__ = [
    "Attempt",
    "AttemptContext",
    "AttemptTimeoutError",
    "BatchrunError",
    "ConfigError",
    "ErrorInfo",
    "Outcome",
    "PluginError",
    "PoolBrokenError",
    "RetrySettings",
    "RunInfo",
    "RunSummary",
    "Task",
    "UsageError",
    "__version__",
    "current_attempt",
    "hookimpl",
    "hookspec",
]
