"""Matrix expansion of task tables for :mod:`batchrun.config`.

A task table with ``matrix = { n = [1, 2], mode = ["a", "b"] }`` becomes one
task per combination, in key order then value order (the cartesian product).
In the ``id`` and in every string inside ``args`` and ``kwargs``, ``{name}``
fields name matrix keys:

- a string that is exactly ``"{name}"`` becomes the value itself, with its type;
- any other string with fields is filled in with :meth:`str.format`, so
  ``"{{"`` and ``"}}"`` stand for literal braces;
- the ``id`` is always filled in with :meth:`str.format`, so it stays a string.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import string
from collections.abc import Iterator, Mapping
from typing import Any

from batchrun._config_checks import KeyPath, Problems, show


_FORMATTER = string.Formatter()
_WHOLE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FIELD_NAME = re.compile(r"[^.\[]*")


class TemplateError(ValueError):
    """Raised when a template cannot be filled in for one matrix combination."""

    def __init__(self, key: KeyPath, text: str) -> None:
        super().__init__(text)
        #: The key whose template failed.
        self.key = key
        #: The failure, as one clause.
        self.text = text


def template_fields(text: str) -> list[str]:
    """Return the field names of the :meth:`str.format` template ``text``.

    :raises ValueError: when ``text`` has an unmatched brace.
    """
    return [name for _, name, _, _ in _FORMATTER.parse(text) if name is not None]


def has_fields(text: str) -> bool:
    """Return whether ``text`` has a ``{...}`` field; a malformed template has none."""
    try:
        return bool(template_fields(text))
    except ValueError:
        return False


#: Most tasks one matrix may make. Matrices expand when the file loads, so
#: that duplicate ids are found before the run, and that costs memory per task.
MAX_MATRIX_TASKS = 100_000


def read_matrix(problems: Problems, item: Mapping[str, Any], path: KeyPath) -> dict[str, list[Any]] | None:
    """Return the checked ``matrix`` of a task table, or ``None`` when it is absent or invalid."""
    if "matrix" not in item:
        return None

    key = (*path, "matrix")
    matrix = item["matrix"]
    if not isinstance(matrix, Mapping) or not matrix:
        problems.add(key, f"expected a table of value lists such as {{ n = [1, 2] }}, got {show(matrix)}")
        return None

    start = len(problems)
    for name, values in matrix.items():
        if not isinstance(name, str) or not name.isidentifier():
            problems.add(
                key,
                f"expected matrix keys that are identifiers (letters, digits and '_'), got {show(name)}",
                at=(*key, name),
            )
        elif not isinstance(values, (list, tuple)) or not values:
            problems.add((*key, name), f"expected a non-empty list of values, got {show(values)}")
    if len(problems) > start:
        return None

    combinations = math.prod(len(values) for values in matrix.values())
    if combinations > MAX_MATRIX_TASKS:
        problems.add(
            key,
            f"the matrix makes {combinations:,} tasks, more than the {MAX_MATRIX_TASKS:,} one [[tasks]] entry may"
            " make, because matrices are expanded when the file loads; produce big batches lazily with [[sources]]",
        )
        return None
    return {name: list(values) for name, values in matrix.items()}


def _check_string(problems: Problems, text: str, key: KeyPath, names: list[str]) -> None:
    try:
        fields = template_fields(text)
    except ValueError as exc:
        reason = str(exc)
        reason = reason[:1].lower() + reason[1:]
        problems.add(key, f"invalid template {text!r}: {reason}; write '{{{{' and '}}}}' for literal braces")
        return

    for field in fields:
        name = _FIELD_NAME.match(field).group()
        if not name.isidentifier():
            example = "{" + names[0] + "}"
            problems.add(key, f"template {text!r} has a positional field; name a matrix key, such as {example!r}")
        elif name not in names:
            listed = ", ".join(repr(known) for known in names)
            problems.add(key, f"template {text!r} refers to unknown matrix key {name!r}; matrix keys are {listed}")


def _check_value(problems: Problems, value: Any, key: KeyPath, names: list[str]) -> None:
    if isinstance(value, str):
        _check_string(problems, value, key, names)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_value(problems, item, (*key, index), names)
    elif isinstance(value, Mapping):
        for name, item in value.items():
            _check_value(problems, item, (*key, name), names)


def check_templates(
    problems: Problems,
    task_id: str | None,
    arguments: tuple[list[Any], Mapping[str, Any]],
    path: KeyPath,
    matrix: dict[str, list[Any]],
) -> None:
    """Record a problem for each template in the id, args and kwargs that cannot name a matrix key."""
    names = list(matrix)
    combinations = math.prod(len(values) for values in matrix.values())
    if task_id is not None:
        _check_string(problems, task_id, (*path, "id"), names)
        if combinations > 1 and not has_fields(task_id):
            problems.add(
                (*path, "id"),
                f"id {task_id!r} is the same for all {combinations} matrix combinations;"
                f" put matrix keys in it, such as '{task_id}-{{{names[0]}}}'",
            )
    _check_value(problems, arguments[0], (*path, "args"), names)
    _check_value(problems, arguments[1], (*path, "kwargs"), names)


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={show(value)}" for name, value in values.items())


def _fill_string(text: str, values: Mapping[str, Any], key: KeyPath) -> str:
    try:
        return text.format_map(values)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise TemplateError(
            key, f"cannot fill in template {text!r} with {_describe(values)}: {type(exc).__name__}: {exc}"
        ) from exc


def _fill(value: Any, values: Mapping[str, Any], key: KeyPath) -> Any:
    if isinstance(value, str):
        whole = _WHOLE_FIELD.fullmatch(value)
        if whole is not None:
            # Copy, so tasks never share a mutable list or table.
            return copy.deepcopy(values[whole.group(1)])
        if "{" not in value and "}" not in value:
            return value
        return _fill_string(value, values, key)
    if isinstance(value, (list, tuple)):
        return [_fill(item, values, (*key, index)) for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        return {name: _fill(item, values, (*key, name)) for name, item in value.items()}
    return value


def expand_matrix(
    matrix: dict[str, list[Any]], task_id: str, args: list[Any], kwargs: Mapping[str, Any], path: KeyPath
) -> Iterator[tuple[str, list[Any], dict[str, Any]]]:
    """Yield ``(id, args, kwargs)`` for each combination of matrix values, templates filled in.

    :raises TemplateError: when a template cannot be filled in, or the id comes out empty.
    """
    names = list(matrix)
    for combination in itertools.product(*matrix.values()):
        values = dict(zip(names, combination))
        filled_id = _fill_string(task_id, values, (*path, "id"))
        if not filled_id.strip():
            raise TemplateError((*path, "id"), f"template {task_id!r} gives an empty id for {_describe(values)}")
        filled_args = _fill(args, values, (*path, "args"))
        filled_kwargs = _fill(kwargs, values, (*path, "kwargs"))
        yield filled_id, filled_args, filled_kwargs
