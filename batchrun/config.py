"""Read a batch file (TOML), validate it and build the run settings and the tasks.

:func:`load_config` checks everything it can before any task starts: every
key and value, and every ``call`` of ``[[tasks]]`` and ``[[sources]]``, which
it imports. It reports all problems at once in one :class:`ConfigError`, one
line per problem, sorted by key path. Tasks that ``[[sources]]`` functions
produce are checked the same way, one by one, as :meth:`BatchConfig.iter_tasks`
reaches them, so a source is never read ahead.

Messages name keys as ``[run].timeout``, ``tasks[2].kwargs.seed`` (indexes count
from 0) and ``sources[0][5].id`` for the sixth task table that the first source
returned.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from batchrun import _config_checks as checks
from batchrun._config_checks import KeyLines, KeyPath, Problems, format_key, read_key, show
from batchrun._config_imports import CallChecker, add_import_paths, resolve_callable
from batchrun._config_matrix import TemplateError, check_templates, expand_matrix, has_fields, read_matrix
from batchrun.models import RetrySettings, Task


__all__ = [
    "BatchConfig",
    "RunSettings",
    "TaskSource",
    "add_import_paths",
    "load_config",
    "resolve_callable",
]

TOP_KEYS = ("run", "retry", "tasks", "sources", "plugins")
RUN_KEYS = ("name", "max_concurrent", "timeout", "timeout_grace", "deadline", "plugins", "journal", "max_result_bytes")
RETRY_KEYS = ("policy", "max_attempts", "delay", "max_delay", "jitter", "seed", "retry_on", "max_failures")
TASK_KEYS = ("id", "call", "args", "kwargs", "matrix", "timeout", *RETRY_KEYS)
SOURCE_KEYS = ("call", "args", "kwargs")

_RETRY_CHECKS: Mapping[str, Callable[[Any], Any]] = MappingProxyType(
    {
        "policy": checks.non_empty_string,
        "max_attempts": checks.positive_int,
        "delay": checks.non_negative_seconds,
        "max_delay": checks.non_negative_seconds,
        "jitter": checks.boolean,
        "seed": checks.integer,
        "retry_on": checks.exception_names,
        "max_failures": checks.failure_limits,
    }
)

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _default_max_concurrent() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class RunSettings:
    """The ``[run]`` table: how the whole run behaves."""

    #: Name used in logs and file names; defaults to the config file's stem.
    name: str
    #: Ceiling on attempts running at once; defaults to the CPU count.
    max_concurrent: int = field(default_factory=_default_max_concurrent)
    #: Seconds an attempt may run, or ``None`` for no limit.
    timeout: float | None = None
    #: Seconds an attempt gets between its soft stop (timeout or cancel, raised inside the task) and the kill.
    timeout_grace: float = 3.0
    #: Seconds the whole run may take, or ``None`` for no limit.
    deadline: float | None = None
    #: Plugins to load, by module path or entry-point name: ``[run] plugins`` then ``-p``.
    plugins: tuple[str, ...] = ()
    #: Path of the run journal, relative paths from the config file's folder;
    #: ``None`` for the default ``.batchrun/<name>.sqlite``, ``False`` for no journal.
    journal: str | bool | None = None
    #: Largest result the journal stores as JSON or repr text, in bytes.
    max_result_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TaskSource:
    """A ``[[sources]]`` entry: a function that returns an iterable of task tables."""

    #: Import path of the function, written as ``"module:function"``.
    call: str
    #: Positional arguments of the call.
    args: tuple[Any, ...] = ()
    #: Keyword arguments of the call (read-only).
    kwargs: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True)
class BatchConfig:
    """A validated batch: run settings, retry defaults, tasks and task sources."""

    #: The config file as the caller named it, or ``None`` for a batch built in Python.
    path: Path | None
    #: Absolute path of the config file's folder, which tasks may import from.
    root: Path | None
    #: The ``[run]`` settings, with command-line overrides applied.
    run: RunSettings
    #: The ``[retry]`` defaults, with ``--max-attempts`` applied.
    retry: RetrySettings
    #: Settings of each plugin from its ``[plugins.<name>]`` table, not validated here.
    plugin_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _EMPTY)
    #: The ``[[tasks]]`` entries, matrices expanded, in file order.
    tasks: tuple[Task, ...] = ()
    #: The ``[[sources]]`` entries, in file order.
    sources: tuple[TaskSource, ...] = ()
    #: ``--max-attempts``, which overrides the ``max_attempts`` of every source task too.
    max_attempts_override: int | None = None
    #: The current folder when the config was loaded.
    working_dir: Path | None = None
    #: Results of the import checks of ``call`` strings, shared with load time so each is imported once.
    _calls: CallChecker = field(default_factory=CallChecker, repr=False, compare=False)

    def import_paths(self) -> list[str]:
        """Return the folders tasks import from: the config file's folder, then the current folder."""
        folders = [self.root, self.working_dir if self.working_dir is not None else Path.cwd()]
        paths: list[str] = []
        for folder in folders:
            if folder is not None and str(folder) not in paths:
                paths.append(str(folder))
        return paths

    def iter_tasks(self) -> Iterator[Task]:
        """Yield the explicit tasks, then the tasks of each source, reading sources lazily.

        Each call returns a fresh iterator. A source function is called when
        the iterator reaches it, and each task table it returns is checked
        when it is pulled.

        :raises ConfigError: when a source raises, returns something other
            than an iterable, yields an invalid task table, or yields a task
            id already used. The message names the source.
        """
        yield from self.tasks
        if not self.sources:
            return

        add_import_paths(self.import_paths())
        label = None if self.path is None else os.fspath(self.path)
        context = _TaskContext(self.retry, self.run.timeout, self.max_attempts_override, self._calls)
        # Ids of explicit tasks map to a description, because Task does not record its table.
        used: dict[str, KeyPath | str] = dict.fromkeys((task.id for task in self.tasks), "a [[tasks]] entry")

        for source_index, source in enumerate(self.sources):
            source_path: KeyPath = ("sources", source_index)
            function = resolve_callable(source.call, where=_where(label, (*source_path, "call")))
            try:
                items = function(*source.args, **source.kwargs)
            except Exception as error:
                checks.raise_one(label, f"{format_key(source_path)}: {source.call!r} raised {type(error).__name__}: {error}")
            if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
                checks.raise_one(
                    label,
                    f"{format_key((*source_path, 'call'))}: expected {source.call!r} to return an iterable"
                    f" of task tables, got {show(items)}",
                )

            for item_index, item in enumerate(_guarded(items, label, source_path, source.call)):
                item_path: KeyPath = (*source_path, item_index)
                problems = Problems(label)
                tasks = _read_task_table(problems, item, item_path, context)
                for task in tasks:
                    if task.id in used:
                        problems.add((*item_path, "id"), _duplicate_text(task.id, used[task.id], item_path))
                        break
                    used[task.id] = item_path
                problems.raise_if_any()
                yield from tasks


def _guarded(items: Iterable[Any], label: str | None, source_path: KeyPath, call: str) -> Iterator[Any]:
    """Yield from a source's iterable, turning an exception it raises into a ConfigError that names the source."""
    iterator = iter(items)
    produced = 0
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as error:
            checks.raise_one(
                label,
                f"{format_key(source_path)}: {call!r} raised {type(error).__name__} after producing"
                f" {produced} task tables: {error}",
            )
        produced += 1
        yield item


def load_config(
    path: str | os.PathLike[str],
    *,
    max_concurrent: int | None = None,
    max_attempts: int | None = None,
    extra_plugins: Sequence[str] = (),
) -> BatchConfig:
    """Read, validate and return the batch described by the TOML file at ``path``.

    Before importing any ``call``, this puts the config file's folder and the
    current folder at the front of ``sys.path``.

    :param path: the batch file.
    :param max_concurrent: ``--max-concurrent``, which replaces ``[run] max_concurrent``.
    :param max_attempts: ``--max-attempts``, which replaces ``max_attempts`` in
        ``[retry]`` and in every task.
    :param extra_plugins: plugins given with ``-p``, loaded after ``[run] plugins``.
    :raises ConfigError: listing every problem found, one per line.
    """
    config_path = Path(path)
    label = os.fspath(path)
    text = checks.read_text(config_path, label)
    data = checks.parse_toml(text, label)
    problems = Problems(label, KeyLines(text).line_of)

    root = config_path.resolve().parent
    working_dir = Path.cwd()
    importlib.invalidate_caches()
    add_import_paths([root, working_dir])

    _check_top_level_keys(problems, data)
    max_concurrent = _read_option(problems, "--max-concurrent", max_concurrent)
    max_attempts = _read_option(problems, "--max-attempts", max_attempts)
    run = _read_run(problems, data, config_path.stem, max_concurrent, extra_plugins)
    retry = _read_retry(problems, data, max_attempts)
    plugin_settings = _read_plugin_settings(problems, data)

    calls = CallChecker()
    context = _TaskContext(retry, run.timeout, max_attempts, calls)
    tasks = _read_tasks(problems, data, context)
    sources = _read_sources(problems, data, calls)
    if not data.get("tasks") and not data.get("sources"):
        problems.add((), "the batch has no tasks; add a [[tasks]] table or a [[sources]] table")

    problems.raise_if_any()
    return BatchConfig(
        path=config_path,
        root=root,
        run=run,
        retry=retry,
        plugin_settings=plugin_settings,
        tasks=tasks,
        sources=sources,
        max_attempts_override=max_attempts,
        working_dir=working_dir,
        _calls=calls,
    )


# -- top-level tables -------------------------------------------------------------


def _check_top_level_keys(problems: Problems, data: Mapping[str, Any]) -> None:
    for key in data:
        if key in TOP_KEYS:
            continue

        # A key written before the first header belongs to the top level, so
        # `max_concurrent = 4` above `[run]` is a common slip.
        if key in RUN_KEYS:
            hint = "move it under [run]"
        elif key in RETRY_KEYS:
            hint = "move it under [retry]"
        elif key in TASK_KEYS:
            hint = "move it into a [[tasks]] table"
        else:
            close = difflib.get_close_matches(key, TOP_KEYS, n=1)
            valid = ", ".join(f"[{name}]" for name in TOP_KEYS)
            hint = f"did you mean [{close[0]}]?" if close else f"valid tables are {valid}"
        problems.add((), f"unknown top-level key {key!r}; {hint}", at=(key,))


def _read_option(problems: Problems, option: str, value: Any) -> int | None:
    """Return a checked command-line integer option, or ``None`` when it is absent or invalid."""
    return read_key(problems, {option: value}, (), option, checks.positive_int) if value is not None else None


def _section(problems: Problems, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = data.get(name, _EMPTY)
    if not isinstance(section, Mapping):
        problems.add((name,), f"expected a table [{name}], got {show(section)}")
        return _EMPTY
    return section


def _read_run(
    problems: Problems,
    data: Mapping[str, Any],
    stem: str,
    max_concurrent: int | None,
    extra_plugins: Sequence[str],
) -> RunSettings:
    path: KeyPath = ("run",)
    extra_plugins = tuple(extra_plugins)
    section = _section(problems, data, "run")
    checks.check_unknown_keys(problems, section, path, RUN_KEYS)

    name = read_key(problems, section, path, "name", checks.run_name)
    file_max_concurrent = read_key(problems, section, path, "max_concurrent", checks.positive_int)
    timeout = read_key(problems, section, path, "timeout", checks.positive_seconds)
    timeout_grace = read_key(problems, section, path, "timeout_grace", checks.non_negative_seconds)
    deadline = read_key(problems, section, path, "deadline", checks.positive_seconds)
    plugins = read_key(problems, section, path, "plugins", checks.string_tuple) or ()
    journal = read_key(problems, section, path, "journal", checks.journal_setting)
    max_result_bytes = read_key(problems, section, path, "max_result_bytes", checks.positive_int)

    for index, plugin in enumerate(plugins):
        if plugin in plugins[:index]:
            problems.add((*path, "plugins"), f"plugin {plugin!r} is listed twice; remove one")
    for index, plugin in enumerate(extra_plugins):
        if not isinstance(plugin, str) or not plugin.strip():
            problems.add(("-p",), f"expected a plugin module path or entry-point name, got {show(plugin)}")
        elif plugin in plugins:
            problems.add(("-p",), f"plugin {plugin!r} is already listed in [run].plugins; remove one")
        elif plugin in extra_plugins[:index]:
            problems.add(("-p",), f"plugin {plugin!r} is given twice; remove one")

    # Each of these is None when absent or invalid, and never 0.
    return RunSettings(
        name=name if name is not None else checks.default_run_name(stem),
        max_concurrent=max_concurrent or file_max_concurrent or _default_max_concurrent(),
        timeout=timeout,
        timeout_grace=timeout_grace if timeout_grace is not None else 3.0,
        deadline=deadline,
        plugins=(*plugins, *extra_plugins),
        journal=journal,
        max_result_bytes=max_result_bytes if max_result_bytes is not None else 1024 * 1024,
    )


def _read_retry_keys(problems: Problems, table: Mapping[str, Any], path: KeyPath) -> dict[str, Any]:
    """Return the valid retry keys of ``table`` with their checked values."""
    overrides = {}
    for key, check in _RETRY_CHECKS.items():
        if key not in table:
            continue  # most tables set no retry key, and sources may yield thousands of them
        value = read_key(problems, table, path, key, check)
        if value is not None:
            overrides[key] = value
    return overrides


def _merge_retry(
    problems: Problems, base: RetrySettings, overrides: dict[str, Any], path: KeyPath, max_attempts: int | None
) -> RetrySettings:
    """Apply ``overrides`` and then ``--max-attempts`` to ``base``, checking that delay <= max_delay."""
    if not overrides and (max_attempts is None or max_attempts == base.max_attempts):
        # The common task sets no retry key: share the defaults instead of copying them.
        return base
    merged = replace(base, **overrides)
    # Only a table that sets delay or max_delay can break the bound, so a bad
    # [retry] is not reported again for every task.
    sets_delays = "delay" in overrides or "max_delay" in overrides
    if sets_delays and merged.max_delay < merged.delay:
        # Point at the key set in this table; when both are, max_delay is the bound to raise.
        if "max_delay" in overrides:
            text = f"expected a number of seconds >= delay ({merged.delay!r}), got {merged.max_delay!r}"
            problems.add((*path, "max_delay"), text)
        else:
            text = f"expected a number of seconds <= max_delay ({merged.max_delay!r}), got {merged.delay!r}"
            problems.add((*path, "delay"), text)
    if max_attempts is not None:
        merged = replace(merged, max_attempts=max_attempts)
    return merged


def _read_retry(problems: Problems, data: Mapping[str, Any], max_attempts: int | None) -> RetrySettings:
    path: KeyPath = ("retry",)
    section = _section(problems, data, "retry")
    checks.check_unknown_keys(problems, section, path, RETRY_KEYS)
    overrides = _read_retry_keys(problems, section, path)
    return _merge_retry(problems, RetrySettings(), overrides, path, max_attempts)


def _read_plugin_settings(problems: Problems, data: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    raw = data.get("plugins", _EMPTY)
    if not isinstance(raw, Mapping):
        problems.add(
            ("plugins",),
            f"expected [plugins.<name>] tables of plugin settings, got {show(raw)};"
            " list the plugins to load in [run].plugins",
        )
        return _EMPTY

    settings: dict[str, Mapping[str, Any]] = {}
    for name, table in raw.items():
        if isinstance(table, Mapping):
            settings[name] = MappingProxyType(dict(table))
        else:
            problems.add(("plugins", name), f"expected a table of plugin settings, got {show(table)}")
    return MappingProxyType(settings)


# -- tasks and sources ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TaskContext:
    """Defaults and the import cache that building a Task from its table needs."""

    retry: RetrySettings
    timeout: float | None
    max_attempts: int | None
    calls: CallChecker


def _where(label: str | None, key: KeyPath) -> str:
    return format_key(key) if label is None else f"{label}: {format_key(key)}"


def _read_call(problems: Problems, table: Mapping[str, Any], path: KeyPath, calls: CallChecker) -> str | None:
    if "call" not in table:
        problems.add(path, "missing required key 'call'; set it to 'module:function'", at=(*path, "call"))
        return None

    call = read_key(problems, table, path, "call", checks.non_empty_string)
    if call is None:
        return None
    problem = calls.problem(call)
    if problem is not None:
        problems.add((*path, "call"), problem)
        return None
    return call


def _positional_arguments(value: Any) -> list[Any]:
    return checks.array(value, "an array of positional arguments")


def _keyword_arguments(value: Any) -> Mapping[str, Any]:
    return checks.table(value, "a table of keyword arguments")


def _read_arguments(
    problems: Problems, table: Mapping[str, Any], path: KeyPath
) -> tuple[list[Any], Mapping[str, Any]] | None:
    """Return the checked ``args`` and ``kwargs`` of ``table``, or ``None`` when one is invalid."""
    start = len(problems)
    args = read_key(problems, table, path, "args", _positional_arguments)
    kwargs = read_key(problems, table, path, "kwargs", _keyword_arguments)
    if len(problems) > start:
        return None
    return (args if args is not None else [], kwargs if kwargs is not None else _EMPTY)


def _read_task_table(problems: Problems, item: Any, path: KeyPath, context: _TaskContext) -> list[Task]:
    """Check one task table and return its tasks, one per matrix combination; [] when it is invalid."""
    if not isinstance(item, Mapping) or not all(isinstance(key, str) for key in item):
        problems.add(path, f"expected a table of task keys, got {show(item)}")
        return []

    start = len(problems)
    checks.check_unknown_keys(problems, item, path, TASK_KEYS)
    call = _read_call(problems, item, path, context.calls)
    arguments = _read_arguments(problems, item, path)
    timeout = read_key(problems, item, path, "timeout", checks.positive_seconds)
    overrides = _read_retry_keys(problems, item, path)
    retry = _merge_retry(problems, context.retry, overrides, path, context.max_attempts)

    task_id = None
    if "id" not in item:
        problems.add(path, "missing required key 'id'; give each task a unique id", at=(*path, "id"))
    else:
        task_id = read_key(problems, item, path, "id", checks.non_empty_string)

    matrix = read_matrix(problems, item, path)
    if matrix is not None and arguments is not None:
        check_templates(problems, task_id, arguments, path, matrix)
    elif "matrix" not in item and task_id is not None and has_fields(task_id):
        problems.add(
            (*path, "id"),
            f"template {task_id!r} needs a matrix, but this task has none; add a matrix table,"
            " or write '{{' and '}}' for literal braces",
        )

    if len(problems) > start or call is None or task_id is None or arguments is None:
        return []

    timeout = timeout if timeout is not None else context.timeout
    if matrix is None:
        args, kwargs = arguments
        return [Task(task_id, call, tuple(args), MappingProxyType(dict(kwargs)), timeout, retry)]

    # NOTE: the whole matrix is expanded here, at load time, so that duplicate
    # ids are found before the run. Memory grows with the number of combinations.
    try:
        expanded = list(expand_matrix(matrix, task_id, arguments[0], arguments[1], path))
    except TemplateError as exc:
        problems.add(exc.key, exc.text)
        return []
    return [
        Task(expanded_id, call, tuple(args), MappingProxyType(kwargs), timeout, retry)
        for expanded_id, args, kwargs in expanded
    ]


def _read_tasks(problems: Problems, data: Mapping[str, Any], context: _TaskContext) -> tuple[Task, ...]:
    raw = data.get("tasks", [])
    if not isinstance(raw, list):
        problems.add(("tasks",), f"expected [[tasks]] tables, got {show(raw)}")
        return ()

    tasks: list[Task] = []
    used: dict[str, KeyPath] = {}
    for index, item in enumerate(raw):
        path: KeyPath = ("tasks", index)
        for task in _read_task_table(problems, item, path, context):
            if task.id in used:
                problems.add((*path, "id"), _duplicate_text(task.id, used[task.id], path))
                break
            used[task.id] = path
            tasks.append(task)
    return tuple(tasks)


def _duplicate_text(task_id: str, first: KeyPath | str, path: KeyPath) -> str:
    if first == path:
        return (
            f"duplicate task id {task_id!r}: the matrix gives it to several combinations;"
            " put every matrix key in the id template"
        )
    first_name = first if isinstance(first, str) else format_key(first)
    return f"duplicate task id {task_id!r}; {first_name} already uses it"


def _read_sources(problems: Problems, data: Mapping[str, Any], calls: CallChecker) -> tuple[TaskSource, ...]:
    raw = data.get("sources", [])
    if not isinstance(raw, list):
        problems.add(("sources",), f"expected [[sources]] tables, got {show(raw)}")
        return ()

    sources: list[TaskSource] = []
    for index, item in enumerate(raw):
        path: KeyPath = ("sources", index)
        if not isinstance(item, Mapping):
            problems.add(path, f"expected a table with keys 'call', 'args' and 'kwargs', got {show(item)}")
            continue

        checks.check_unknown_keys(problems, item, path, SOURCE_KEYS)
        call = _read_call(problems, item, path, calls)
        arguments = _read_arguments(problems, item, path)
        if call is not None and arguments is not None:
            args, kwargs = arguments
            sources.append(TaskSource(call, tuple(args), MappingProxyType(dict(kwargs))))
    return tuple(sources)


