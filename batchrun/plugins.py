"""Build the plugin manager and call hooks through a typed facade.

Plugins load in this order: the built-in plugins, then the ``batchrun``
entry-point group, then the modules named by ``[run] plugins`` and ``-p``.
``BATCHRUN_DISABLE_PLUGINS`` (comma-separated names) blocks plugins by name,
built-ins included, for example ``BATCHRUN_DISABLE_PLUGINS=story``.

pluggy stops at the first implementation that raises, so one broken notifier
would silence the others. :class:`Hooks` therefore calls each implementation
of a notification hook on its own and logs what raised.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import math
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

import pluggy

from batchrun import hookspecs
from batchrun.errors import ConfigError, PluginError


if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from batchrun.models import Attempt, ErrorInfo, Outcome, RunInfo, RunSummary, Task


log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "batchrun"
DISABLE_VARIABLE = "BATCHRUN_DISABLE_PLUGINS"

NOTIFICATION_HOOKS = ("on_run_start", "on_start", "on_fail", "on_retry", "on_terminal", "on_run_end")

#: How many failures of one plugin's hook are logged with a traceback; later
#: ones are counted and reported once at the end of the run.
LOGGED_FAILURES_PER_HOOK = 3


def create_plugin_manager(
    plugin_names: Sequence[str] = (),
    *,
    builtins: Iterable[tuple[str, object]] | None = None,
    config_path: str | None = None,
    load_entry_points: bool = True,
) -> pluggy.PluginManager:
    """Create a plugin manager with the built-ins, entry points and named plugins registered.

    :param plugin_names: module paths or entry-point names from ``[run] plugins`` and ``-p``.
    :param builtins: ``(name, plugin)`` pairs to register first; the default is the shipped set.
    :param config_path: the configuration file, named in error messages.
    :param load_entry_points: whether to load the ``batchrun`` entry-point group.
    :raises ConfigError: when a named plugin cannot be found or imported.
    :raises PluginError: when a plugin implements a hook incorrectly.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for name in _disabled_names():
        manager.set_blocked(name)

    if builtins is None:
        builtins = default_builtins()
    for name, plugin in builtins:
        register(manager, plugin, name)

    entry_points = {}
    if load_entry_points:
        entry_points = {point.name: point for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        for name, point in entry_points.items():
            if manager.is_blocked(name) or manager.has_plugin(name):
                continue
            try:
                plugin = point.load()
            except Exception as error:
                raise PluginError(f"cannot load plugin {name!r} from entry point {point.value!r}: {error}") from error
            register(manager, plugin, name)

    where = f"{config_path}: " if config_path else ""
    for index, name in enumerate(plugin_names):
        if manager.is_blocked(name):
            continue
        plugin = _import_named_plugin(name, entry_points, where=f"{where}run.plugins[{index}]")
        if manager.is_registered(plugin):
            log.debug("plugin-skipped name=%s: already registered", name)
            continue
        register(manager, plugin, name)

    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        raise PluginError(f"{error}; check the spelling of the hook name against batchrun.hookspecs") from error
    return manager


def register(manager: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Register a plugin after checking that its hooks are plain functions.

    :raises PluginError: when an implementation is a coroutine or generator
        function, whose body pluggy would never run, or a wrapper of a
        notification hook, which batchrun calls one implementation at a time.
    """
    for attribute in dir(plugin):
        function = getattr(plugin, attribute, None)
        options = manager.parse_hookimpl_opts(plugin, attribute) if callable(function) else None
        if options is None:
            continue
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            raise PluginError(
                f"plugin {name!r}: hook {attribute!r} is written as 'async def', but hooks run "
                "synchronously in the supervisor; make it a plain function"
            )
        is_wrapper = options.get("wrapper") or options.get("hookwrapper")
        if is_wrapper and attribute in NOTIFICATION_HOOKS:
            raise PluginError(
                f"plugin {name!r}: hook {attribute!r} is a wrapper, but notification hooks call each "
                "implementation on its own; drop wrapper=True"
            )
    try:
        manager.register(plugin, name)
    except ValueError as error:
        raise PluginError(f"cannot register plugin {name!r}: {error}") from error


def default_builtins() -> list[tuple[str, object]]:
    """Return the plugins that ship with batchrun, in registration order."""
    from batchrun.builtin import retry_policies, story

    return [("retry-policies", retry_policies), ("story", story.StoryLog())]


def _disabled_names() -> list[str]:
    value = os.environ.get(DISABLE_VARIABLE, "")
    return [name.strip() for name in value.split(",") if name.strip()]


def _import_named_plugin(name: str, entry_points: dict[str, Any], *, where: str) -> object:
    point = entry_points.get(name)
    if point is not None:
        return point.load()
    try:
        return importlib.import_module(name)
    except ImportError as error:
        known = ", ".join(sorted(entry_points)) or "none installed"
        raise ConfigError(
            f"{where}: cannot import plugin {name!r}: {error}. Give an importable module path "
            f"or the name of an installed 'batchrun' entry point (installed: {known})"
        ) from error


class Hooks:
    """The supervisor's typed way to call hooks; it isolates failing notification hooks."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        #: Number of hook calls that raised during the run.
        self.errors = 0
        self._failures: Counter[tuple[str, str]] = Counter()
        self._callers: dict[str, list[tuple[str, Callable[..., Any], tuple[str, ...]]]] = {}
        for hook_name in NOTIFICATION_HOOKS:
            self._callers[hook_name] = self._collect(hook_name)

    def _collect(self, hook_name: str) -> list[tuple[str, Callable[..., Any], tuple[str, ...]]]:
        caller = getattr(self.manager.hook, hook_name)
        # pluggy calls the last registered implementation first; keep that order.
        return [(impl.plugin_name, impl.function, tuple(impl.argnames)) for impl in reversed(caller.get_hookimpls())]

    # -- notifications -----------------------------------------------------------------

    def on_run_start(self, run: RunInfo) -> None:
        self._notify("on_run_start", {"run": run})

    def on_start(self, task: Task, attempt: Attempt) -> None:
        self._notify("on_start", {"task": task, "attempt": attempt})

    def on_fail(self, task: Task, attempt: Attempt, error: ErrorInfo) -> None:
        self._notify("on_fail", {"task": task, "attempt": attempt, "error": error})

    def on_retry(self, task: Task, attempt: Attempt, delay: float) -> None:
        self._notify("on_retry", {"task": task, "attempt": attempt, "delay": delay})

    def on_terminal(self, task: Task, outcome: Outcome) -> None:
        self._notify("on_terminal", {"task": task, "outcome": outcome})

    def on_run_end(self, summary: RunSummary) -> None:
        self._notify("on_run_end", {"summary": summary})

    def _notify(self, hook_name: str, arguments: dict[str, Any]) -> None:
        for plugin_name, function, argnames in self._callers[hook_name]:
            try:
                function(*[arguments[name] for name in argnames])
            except (Exception, SystemExit) as error:  # noqa: BLE001 - not even sys.exit() in a plugin may end the run
                self._record_failure(plugin_name, hook_name, error)

    def _record_failure(self, plugin_name: str, hook_name: str, error: BaseException) -> None:
        self.errors += 1
        key = (plugin_name, hook_name)
        self._failures[key] += 1
        count = self._failures[key]
        if count <= LOGGED_FAILURES_PER_HOOK:
            log.warning(
                "hook-failed plugin=%s hook=%s error=%s: %s",
                plugin_name,
                hook_name,
                type(error).__name__,
                error,
                exc_info=error,
            )
        if count == LOGGED_FAILURES_PER_HOOK:
            log.warning("hook-failed plugin=%s hook=%s: further failures are counted, not logged", plugin_name, hook_name)

    def report_repeated_failures(self) -> None:
        """Log one line for each hook whose failures were counted but not all logged."""
        for (plugin_name, hook_name), count in sorted(self._failures.items()):
            if count > LOGGED_FAILURES_PER_HOOK:
                log.warning("hook-failed plugin=%s hook=%s raised %d times in this run", plugin_name, hook_name, count)

    # -- policy ------------------------------------------------------------------------

    def retry_policy_names(self) -> set[str]:
        names: set[str] = set()
        for result in self.manager.hook.retry_policy_names():
            names.update(result or ())
        return names

    def retry_delay(self, task: Task, attempt: Attempt, error: ErrorInfo) -> float | None:
        """Return the policy's delay in seconds, or ``None`` to stop; a broken policy stops the retries."""
        try:
            delay = self.manager.hook.retry_delay(task=task, attempt=attempt, error=error)
        except (Exception, SystemExit) as failure:  # noqa: BLE001 - a broken policy, even one calling sys.exit(), stops this task's retries only
            self.errors += 1
            log.error(
                "retry-policy-failed task=%s attempt=%d/%d policy=%s error=%s: %s; the task will not be retried",
                task.id,
                attempt.number,
                attempt.max_attempts,
                task.retry.policy,
                type(failure).__name__,
                failure,
                exc_info=failure,
            )
            return None
        if delay is None:
            return None
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not math.isfinite(delay) or delay < 0:
            self.errors += 1
            log.error(
                "retry-policy-invalid task=%s attempt=%d/%d policy=%s: returned %r, expected None or a finite "
                "number of seconds >= 0; the task will not be retried",
                task.id,
                attempt.number,
                attempt.max_attempts,
                task.retry.policy,
                delay,
            )
            return None
        return float(delay)
