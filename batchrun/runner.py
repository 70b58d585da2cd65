"""Run a loaded batch: plugins, worker pool and supervisor wired together."""

from __future__ import annotations

import difflib
import logging
from typing import TYPE_CHECKING

from batchrun.builtin.story import StoryLog
from batchrun.errors import ConfigError
from batchrun.plugins import Hooks, create_plugin_manager, default_builtins
from batchrun.pool import LokyBackend
from batchrun.supervisor import Supervisor


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
    hint = f"did you mean {close[0]!r}?" if close else f"known policies: {', '.join(sorted(known))}"
    return f"unknown retry policy {policy!r}; {hint} A plugin that registers a policy must be listed in [run].plugins"


def run_batch(
    config: BatchConfig,
    *,
    manager: pluggy.PluginManager | None = None,
    story_mode: StoryMode = "auto",
    grace: float = 10.0,
    worker_log_level: int = logging.WARNING,
) -> RunSummary:
    """Run every task of ``config`` to a terminal state and return the summary.

    :param config: the loaded batch.
    :param manager: a plugin manager to use instead of building one from the config.
    :param story_mode: how much of the story log to write: "auto", "all" or "quiet".
    :param grace: seconds running attempts get to finish after a first SIGINT or SIGTERM.
    :param worker_log_level: level of the log records workers write to stderr.
    """
    if manager is None:
        manager = build_plugin_manager(config, story_mode=story_mode)
    hooks = Hooks(manager)
    policy_names = hooks.retry_policy_names()
    check_policy_names(config, policy_names)
    backend = LokyBackend(
        config.run.max_concurrent,
        import_paths=config.import_paths(),
        worker_log_level=worker_log_level,
    )
    supervisor = Supervisor(config, hooks, backend, grace=grace, policy_names=policy_names)
    return supervisor.run()
