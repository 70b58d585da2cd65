"""The ``batchrun`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import TYPE_CHECKING

from batchrun import __version__
from batchrun.errors import ConfigError, PluginError, PoolBrokenError, UsageError
from batchrun.journal import JournalError
from batchrun.log import configure_logging
from batchrun.report import EXIT_OK, EXIT_SIGINT, EXIT_TASKS_FAILED, EXIT_USAGE, exit_code


if TYPE_CHECKING:
    from collections.abc import Sequence


log = logging.getLogger("batchrun")


class _ArgumentParser(argparse.ArgumentParser):
    """An argument parser that raises UsageError instead of exiting, so main() owns every exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """Build the parser for every batchrun command."""
    parser = _ArgumentParser(
        prog="batchrun",
        description="Run a batch of tasks on a bounded pool of worker processes, with retries and plugin hooks.",
    )
    parser.add_argument("--version", action="version", version=f"batchrun {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    commands.required = True

    run = commands.add_parser(
        "run",
        help="run the batch described by a TOML file",
        description=(
            "Run every task of the batch in CONFIG. Exit codes: 0 every task succeeded, 1 at least one task did "
            "not succeed, 2 usage or configuration error, 3 the deadline passed, 130 or 143 stopped by SIGINT "
            "or SIGTERM."
        ),
    )
    run.add_argument("config", metavar="CONFIG", help="path of the batch's TOML file")
    run.add_argument("--max-concurrent", type=_positive_int, metavar="N", help="ceiling on attempts running at once (overrides [run] max_concurrent)")
    run.add_argument("--max-attempts", type=_positive_int, metavar="N", help="total attempts per task, the first included (overrides every max_attempts)")
    run.add_argument("-p", "--plugin", action="append", default=[], metavar="MODULE", help="load a hook plugin by module path or entry-point name; repeatable")
    run.add_argument("--deadline", type=_positive_float, metavar="SECONDS", help="stop the run after this many seconds: unfinished tasks end as cancelled and the exit code is 3 (overrides [run] deadline)")
    journal = run.add_argument_group("journal")
    journal.add_argument("--journal", metavar="PATH", help="journal file (default: [run] journal, or .batchrun/<name>.sqlite next to CONFIG)")
    journal.add_argument("--no-journal", action="store_true", help="run without a journal; --resume and 'batchrun status' then have nothing to read")
    journal.add_argument("--resume", action="store_true", help="continue the latest run of this batch from its journal: succeeded tasks keep their results")
    journal.add_argument("--retry-failed", action="store_true", help="with --resume: run tasks that failed for good or timed out again")
    journal.add_argument("--rerun-changed", action="store_true", help="with --resume: run tasks whose definition changed again from attempt 1")
    journal.add_argument("--events", metavar="FILE", help="also append every journal event to FILE as JSON Lines")
    run.add_argument("--grace", type=_non_negative_float, default=10.0, metavar="SECONDS", help="seconds running attempts get to finish after SIGINT or SIGTERM (default: 10)")
    verbosity = run.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="log every event and the workers' own log records (-vv adds debug details and tracebacks)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log only failures")

    target_help = "a batch's TOML file or its journal (default: the one journal in ./.batchrun/)"
    status = commands.add_parser("status", help="show a run's tasks by state, attempts, slowest tasks and failures", description="Show the latest run recorded in a journal.")
    status.add_argument("target", nargs="?", metavar="CONFIG|JOURNAL", help=target_help)
    results = commands.add_parser("results", help="print each finished task's state, attempts, duration and result", description="Print one row per finished task of the latest run in a journal.")
    results.add_argument("target", nargs="?", metavar="CONFIG|JOURNAL", help=target_help)
    results.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default: jsonl)")
    verify = commands.add_parser(
        "verify",
        help="replay a run's journal and check the three laws",
        description="Check the ceiling, one live attempt per task, and one terminal state per task. Exit code 1 when a law is broken.",
    )
    verify.add_argument("target", nargs="?", metavar="CONFIG|JOURNAL", help=target_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before the run installed its own handler, or after it ended.
        print("batchrun: interrupted", file=sys.stderr)
        return EXIT_SIGINT


def _main(argv: Sequence[str] | None) -> int:
    try:
        arguments = build_parser().parse_args(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE

    if arguments.command == "run":
        return _run(arguments)
    try:
        return _read_journal(arguments)
    except BrokenPipeError:
        # The reader of our output went away (``batchrun results | head``);
        # point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _read_journal(arguments: argparse.Namespace) -> int:
    from batchrun import status

    try:
        if arguments.command == "status":
            return status.show_status(arguments.target)
        if arguments.command == "results":
            return status.write_results(arguments.target, arguments.format)
        if arguments.command == "verify":
            return status.verify(arguments.target)
    except (ConfigError, UsageError, JournalError) as error:
        print(f"batchrun: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _run(arguments: argparse.Namespace) -> int:
    from batchrun.config import load_config
    from batchrun.runner import run_batch

    verbosity = -1 if arguments.quiet else arguments.verbose
    configure_logging(verbosity)
    story_mode = "auto"
    if arguments.quiet:
        story_mode = "quiet"
    elif arguments.verbose:
        story_mode = "all"
    worker_log_level = logging.INFO if arguments.verbose else logging.WARNING

    try:
        config = load_config(
            arguments.config,
            max_concurrent=arguments.max_concurrent,
            max_attempts=arguments.max_attempts,
            extra_plugins=arguments.plugin,
        )
        if arguments.deadline is not None:
            config = dataclasses.replace(config, run=dataclasses.replace(config.run, deadline=arguments.deadline))
        if (arguments.retry_failed or arguments.rerun_changed) and not arguments.resume:
            raise UsageError("--retry-failed and --rerun-changed apply to a resumed run; add --resume")
        if arguments.no_journal and (arguments.journal or arguments.resume or arguments.events):
            raise UsageError("--no-journal cannot be combined with --journal, --resume or --events, which all need the journal")
        journal_path = False if arguments.no_journal else arguments.journal
        summary = run_batch(
            config,
            story_mode=story_mode,
            grace=arguments.grace,
            worker_log_level=worker_log_level,
            journal_path=journal_path,
            resume=arguments.resume,
            retry_failed=arguments.retry_failed,
            rerun_changed=arguments.rerun_changed,
            events_path=arguments.events,
        )
    except (ConfigError, PluginError, UsageError, JournalError) as error:
        print(f"batchrun: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except PoolBrokenError as error:
        # The tasks that finished are in the journal; the rest could not run.
        print(f"batchrun: error: {error}; no worker process could be started or kept running", file=sys.stderr)
        return EXIT_TASKS_FAILED
    return exit_code(summary)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value
