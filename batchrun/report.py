"""Exit codes of the command line, decided in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final


if TYPE_CHECKING:
    from batchrun.models import RunSummary


#: Every task succeeded.
EXIT_OK: Final = 0
#: At least one task did not succeed.
EXIT_TASKS_FAILED: Final = 1
#: The command line or the configuration is invalid.
EXIT_USAGE: Final = 2
#: The run's deadline passed before every task finished.
EXIT_DEADLINE: Final = 3
#: Stopped by SIGINT or SIGTERM: 128 plus the signal number, as shells report it.
EXIT_SIGINT: Final = 130
EXIT_SIGTERM: Final = 143


def exit_code(summary: RunSummary) -> int:
    """Return the process exit code that describes how a run ended."""
    if summary.stop_reason == "SIGINT":
        return EXIT_SIGINT
    if summary.stop_reason == "SIGTERM":
        return EXIT_SIGTERM
    if summary.stop_reason == "deadline":
        return EXIT_DEADLINE
    if summary.succeeded:
        return EXIT_OK
    return EXIT_TASKS_FAILED
