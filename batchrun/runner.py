"""Run a loaded batch: plugins, worker pool and supervisor wired together."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from batchrun.builtin.story import StoryLog
from batchrun.errors import ConfigError, UsageError
from batchrun.journal import Journal, TaskRecord, default_journal_path, definition_hash, load_tasks, open_attempts
from batchrun.plugins import Hooks, create_plugin_manager, default_builtins
from batchrun.pool import LokyBackend, stop_orphaned_workers
from batchrun.resume import ResumePlan
from batchrun.supervisor import Supervisor, changed_task_message


log = logging.getLogger(__name__)


if TYPE_CHECKING:
    import pluggy

    from batchrun.builtin.story import StoryMode
    from batchrun.config import BatchConfig
    from batchrun.models import RunSummary


def build_plugin_manager(config: BatchConfig, *, story_mode: StoryMode = "auto") -> pluggy.PluginManager:
    """Create the plugin manager for a run: built-ins, entry points, then the config's plugins."""
    builtins = [(name, StoryLog(story_mode) if name == "story" else plugin) for name, plugin in default_builtins()]
    path = str(config.path) if config.path else None
    return create_plugin_manager(config.run.plugins, builtins=builtins, config_path=path)


def check_policy_names(config: BatchConfig, known: set[str]) -> None:
    """Raise ConfigError when ``[retry] policy`` or a task's ``policy`` names no registered policy."""
    where = f"{config.path}: " if config.path else ""
    problems = []
    if config.retry.policy not in known:
        problems.append(f"{where}[retry].policy: {_unknown_policy_text(config.retry.policy, known)}")
    for task in config.tasks:
        if task.retry.policy not in known and task.retry.policy != config.retry.policy:
            problems.append(f"{where}task {task.id!r}: policy: {_unknown_policy_text(task.retry.policy, known)}")
            if len(problems) >= 20:
                break
    if problems:
        raise ConfigError("\n".join(problems), path=str(config.path) if config.path else None, problems=problems)


def _unknown_policy_text(policy: str, known: set[str]) -> str:
    close = difflib.get_close_matches(policy, sorted(known), n=1)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif known:
        hint = f"the known policies are {', '.join(sorted(known))}."
    else:
        hint = "no retry policy is registered, because every policy plugin is disabled."
    return f"unknown retry policy {policy!r}; {hint} A plugin that adds a policy must be loaded from [run].plugins, -p or an entry point"


def run_batch(
    config: BatchConfig,
    *,
    manager: pluggy.PluginManager | None = None,
    story_mode: StoryMode = "auto",
    grace: float = 10.0,
    worker_log_level: int = logging.WARNING,
    journal_path: str | os.PathLike[str] | bool | None = None,
    resume: bool = False,
    retry_failed: bool = False,
    rerun_changed: bool = False,
    events_path: str | os.PathLike[str] | None = None,
) -> RunSummary:
    """Run every task of ``config`` to a terminal state and return the summary.

    :param config: the loaded batch.
    :param manager: a plugin manager to use instead of building one from the config.
    :param story_mode: how much of the story log to write: "auto", "all" or "quiet".
    :param grace: seconds running attempts get to finish after a first SIGINT or SIGTERM.
    :param worker_log_level: level of the log records workers write to stderr.
    :param journal_path: the journal file; ``None`` takes ``[run] journal`` or the
        default ``.batchrun/<name>.sqlite`` next to the config, ``False`` runs without one.
    :param resume: continue the latest run of this name recorded in the journal.
    :param retry_failed: when resuming, run tasks that failed for good or timed out again.
    :param rerun_changed: when resuming, run tasks whose definition changed again from attempt 1.
    :param events_path: a file that receives every journal event as a JSON line.
    :raises ConfigError: for an unknown retry policy, or a resumed task whose definition changed.
    :raises JournalError: when the journal is locked by another run, unreadable or of a newer schema.
    """
    if manager is None:
        manager = build_plugin_manager(config, story_mode=story_mode)
    hooks = Hooks(manager)
    policy_names = hooks.retry_policy_names()
    check_policy_names(config, policy_names)

    path = resolve_journal_path(config, journal_path)
    if path is None:
        if resume or events_path is not None:
            raise UsageError("--resume and --events need a journal, but this run has none; drop --no-journal or [run] journal = false")
        return _supervise(config, hooks, policy_names, grace, worker_log_level, None, None)

    with contextlib.ExitStack() as stack:
        events_file = None
        if events_path is not None:
            events_file = stack.enter_context(open(events_path, "a", encoding="utf-8"))  # noqa: SIM115
        journal = Journal(path, max_result_bytes=config.run.max_result_bytes, events_file=events_file)
        stack.callback(journal.close)
        plan = _open_run(config, journal, path, resume=resume, retry_failed=retry_failed, rerun_changed=rerun_changed)
        return _supervise(config, hooks, policy_names, grace, worker_log_level, journal, plan)


def _supervise(config, hooks, policy_names, grace, worker_log_level, journal, plan) -> RunSummary:
    backend = LokyBackend(
        config.run.max_concurrent,
        import_paths=config.import_paths(),
        worker_log_level=worker_log_level,
    )
    supervisor = Supervisor(config, hooks, backend, grace=grace, policy_names=policy_names, journal=journal, resume=plan)
    return supervisor.run()


def resolve_journal_path(config: BatchConfig, override: str | os.PathLike[str] | bool | None) -> Path | None:
    """Return the journal file a run writes, or ``None`` for a run without a journal."""
    choice = override if override is not None else config.run.journal
    if choice is False:
        return None
    if choice is None or choice is True:
        return default_journal_path(config.path, config.run.name)
    path = Path(choice)
    if override is None and not path.is_absolute() and config.root is not None:
        path = config.root / path
    return path


def _open_run(config: BatchConfig, journal: Journal, path: Path, *, resume: bool, retry_failed: bool, rerun_changed: bool) -> ResumePlan | None:
    name = config.run.name
    config_path = str(config.path) if config.path else None
    if not resume:
        earlier = journal.unfinished_run(name)
        if earlier is not None:
            reason = f", stopped by {earlier.stop_reason}" if earlier.stop_reason else ""
            log.warning(
                "run-unfinished an earlier run of %r (run %d%s) did not finish; starting a new run. To continue that"
                " one instead: batchrun run %s --resume",
                name,
                earlier.run_id,
                reason,
                config_path or "CONFIG",
            )
        journal.start_run(name, config_path, describe_config(config), config.run.max_concurrent)
        return None

    earlier = journal.latest_run(name)
    if earlier is None:
        raise UsageError(f"--resume: the journal {path} contains no run named {name!r}; run without --resume to start one")
    # Check for changed tasks before the journal records anything, so a
    # rejected resume leaves the run exactly as it was.
    previous = load_tasks(journal.connection, earlier.run_id)
    interrupted = open_attempts(journal.connection, earlier.run_id)
    for _, task_id, _, _, _, digest in interrupted:
        if task_id not in previous and digest is not None:
            # Only the cut-short attempt recorded this task: it has no charged attempt to carry on.
            previous[task_id] = TaskRecord(task_id, digest, attempts=0, failures={}, retry_due_wall=None, state=None)
    plan = ResumePlan(previous, retry_failed=retry_failed, rerun_changed=rerun_changed)
    changed = [task.id for task in config.tasks if plan.admit(task.id, definition_hash(task)).action == "changed"]
    if changed:
        problems = [changed_task_message(task_id) for task_id in changed[:20]]
        raise ConfigError("\n".join(problems), path=config_path, problems=problems)
    # Workers of a killed supervisor stop by themselves within about a
    # second, but an attempt they still run must not overlap its own rerun.
    stop_orphaned_workers([(task_id, pid) for _, task_id, _, _, pid, _ in interrupted])
    journal.resume_run(earlier, config.run.max_concurrent)
    log.info("run-resumed run %d of %r from %s (%d tasks known)", earlier.run_id, name, path, len(previous))
    return plan


def describe_config(config: BatchConfig) -> dict:
    """Return the resolved config as plain data for the journal's run record."""
    return {
        "run": dataclasses.asdict(config.run),
        "retry": dataclasses.asdict(config.retry),
        "tasks": len(config.tasks),
        "sources": [{"call": source.call, "args": list(source.args), "kwargs": dict(source.kwargs)} for source in config.sources],
        "plugin_settings": {name: dict(settings) for name, settings in config.plugin_settings.items()},
    }
