"""Building blocks of :mod:`batchrun.config`: problem lists, file reading, value checks and key lines.

A key path is a tuple of table keys and array indexes, such as
``("tasks", 2, "timeout")``. Messages render it the way a user reads the file:
``tasks[2].timeout``, ``[run].timeout`` or ``[plugins.alerts]``.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Union

from batchrun.errors import ConfigError


try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


KeyPath = tuple[Union[str, int], ...]

#: Tables that messages write with brackets, as in ``[run].timeout``.
_HEADER_TABLES = frozenset({"run", "retry"})

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 8


def show(value: Any) -> str:
    """Return the repr of ``value``, shortened so one message stays on one screen line."""
    return _repr.repr(value)


def _render_name(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else repr(name)


def format_key(path: KeyPath) -> str:
    """Return the key path as messages write it, for example ``tasks[2].kwargs.seed``."""
    if not path:
        return ""

    first, rest = path[0], path[1:]
    if first in _HEADER_TABLES:
        text = f"[{first}]"
    elif first == "plugins" and rest and isinstance(rest[0], str):
        text = f"[plugins.{_render_name(rest[0])}]"
        rest = rest[1:]
    else:
        text = str(first)

    for part in rest:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{_render_name(part)}"
    return text


def _sort_key(path: KeyPath) -> tuple[tuple[int, int | str], ...]:
    # Indexes sort as numbers, so tasks[10] comes after tasks[9].
    return tuple((0, part) if isinstance(part, int) else (1, part) for part in path)


def is_command_line_key(path: KeyPath) -> bool:
    """Return whether the key path names a command-line option such as ``--max-attempts``."""
    return bool(path) and isinstance(path[0], str) and path[0].startswith("-")


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration problem: the key it is about and what is wrong."""

    #: The key named in the message.
    key: KeyPath
    #: The problem and the expected value, as one clause.
    text: str
    #: The key path used to sort the problem and to find its line; defaults to ``key``.
    at: KeyPath | None = None

    @property
    def position(self) -> KeyPath:
        """The key path the problem sorts by and points at."""
        return self.key if self.at is None else self.at


class Problems:
    """Collects every problem of one configuration, then raises them as one ConfigError."""

    def __init__(self, label: str | None, locate: Callable[[KeyPath], int | None] | None = None) -> None:
        #: The config file as the user named it, or ``None`` for a batch built in Python.
        self.label = label
        self._locate = locate
        self._problems: list[Problem] = []

    def __len__(self) -> int:
        return len(self._problems)

    def add(self, key: KeyPath, text: str, *, at: KeyPath | None = None) -> None:
        """Record that ``key`` has the problem described by ``text``."""
        self._problems.append(Problem(key, text, at))

    def format(self, problem: Problem) -> str:
        """Return the one-line message of ``problem``, led by the file, the line and the key."""
        parts = []
        if self.label is not None and not is_command_line_key(problem.key):
            line = self._locate(problem.position) if self._locate is not None else None
            parts.append(self.label if line is None else f"{self.label}:{line}")
        if problem.key:
            parts.append(format_key(problem.key))
        parts.append(problem.text)
        return ": ".join(parts)

    def raise_if_any(self) -> None:
        """Raise one ConfigError listing every recorded problem, sorted by key path."""
        if not self._problems:
            return

        ordered = sorted(self._problems, key=lambda problem: (_sort_key(problem.position), problem.text))
        messages = [self.format(problem) for problem in ordered]
        raise ConfigError("\n".join(messages), path=self.label, problems=messages)


def raise_one(label: str | None, text: str) -> NoReturn:
    """Raise a ConfigError with a single problem that concerns the whole file."""
    message = text if label is None else f"{label}: {text}"
    raise ConfigError(message, path=label, problems=[message])


def check_unknown_keys(problems: Problems, table: Mapping[str, Any], path: KeyPath, allowed: Sequence[str]) -> None:
    """Record a problem for each key of ``table`` that is not in ``allowed``, with the closest valid key."""
    for key in table:
        if key in allowed:
            continue

        close = difflib.get_close_matches(str(key), allowed, n=1)
        if close:
            hint = f"did you mean {close[0]!r}?"
        else:
            hint = "valid keys are " + ", ".join(repr(name) for name in allowed)
        problems.add(path, f"unknown key {key!r}; {hint}", at=(*path, key))


# -- reading the file ----------------------------------------------------------------


def read_text(path: Path, label: str) -> str:
    """Return the text of the config file; raise ConfigError when it cannot be read or is not UTF-8."""
    if path.is_dir():
        raise_one(label, "expected a TOML file, got a directory")

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        where = "" if path.is_absolute() else f" (looked in {Path.cwd()})"
        raise_one(label, f"config file not found{where}; check the path")
    except OSError as exc:
        raise_one(label, f"cannot read the config file: {exc.strerror or exc}")

    try:
        # utf-8-sig also accepts the byte order mark that some Windows editors write.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise_one(label, f"invalid TOML: the file is not UTF-8 (byte {exc.start}: {exc.reason})")


def parse_toml(text: str, label: str) -> dict[str, Any]:
    """Parse TOML text; raise ConfigError naming the line and column of a syntax error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        detail = str(exc)
        where = ""
        position = _TOML_POSITION.search(detail)
        if position is not None:
            detail = detail[: position.start()]
            where = f" at line {position['line']}, column {position['column']}"
        elif detail.endswith(_TOML_END):
            detail = detail[: -len(_TOML_END)]
            where = " at the end of the file"
        detail = detail[:1].lower() + detail[1:]
        raise_one(label, f"invalid TOML{where}: {detail}")


# tomllib and tomli end their messages with one of these.
_TOML_POSITION = re.compile(r"\s*\(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_TOML_END = " (at end of document)"


# -- value checks -------------------------------------------------------------
#
# Each check returns the value in the type batchrun stores, or raises
# InvalidValue with the text of the problem.


class InvalidValue(ValueError):
    """Raised by a value check; the message is the problem text without the key."""


def _fail(expected: str, value: Any) -> NoReturn:
    raise InvalidValue(f"expected {expected}, got {show(value)}")


def _is_number(value: Any) -> bool:
    # bool is a subclass of int, but `true` is never a number of seconds.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_seconds(value: Any) -> float:
    """Check a finite number of seconds greater than 0."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        _fail("a positive number of seconds", value)
    return float(value)


def non_negative_seconds(value: Any) -> float:
    """Check a finite number of seconds of at least 0."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        _fail("a number of seconds >= 0", value)
    return float(value)


def positive_int(value: Any) -> int:
    """Check an integer of at least 1; floats such as ``2.0`` are rejected."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail("an integer >= 1", value)
    return value


def integer(value: Any) -> int:
    """Check an integer; floats and booleans are rejected."""
    if not isinstance(value, int) or isinstance(value, bool):
        _fail("an integer", value)
    return value


def boolean(value: Any) -> bool:
    """Check a boolean."""
    if not isinstance(value, bool):
        _fail("true or false", value)
    return value


def non_empty_string(value: Any) -> str:
    """Check a string that is not empty or only whitespace."""
    if not isinstance(value, str) or not value.strip():
        _fail("a non-empty string", value)
    return value


_RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def run_name(value: Any) -> str:
    """Check a run name that is safe inside a file name."""
    if not isinstance(value, str) or not _RUN_NAME.fullmatch(value) or value in {".", ".."}:
        _fail("a name made of ASCII letters, digits, '.', '_' and '-', usable as a file name", value)
    return value


def default_run_name(stem: str) -> str:
    """Turn a config file's stem into a valid run name by replacing other characters with '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-")
    return name if name not in {"", ".", ".."} else "batch"


def string_tuple(value: Any) -> tuple[str, ...]:
    """Check a list of non-empty strings."""
    if not isinstance(value, (list, tuple)):
        _fail("a list of non-empty strings", value)
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise InvalidValue(f"expected a list of non-empty strings, got {show(value)} containing {show(item)}")
    return tuple(value)


def exception_names(value: Any) -> tuple[str, ...]:
    """Check ``retry_on``: a non-empty list of exception type names, bare or module-qualified."""
    if not isinstance(value, (list, tuple)):
        _fail("a list of exception type names such as ['ConnectionError']", value)
    if not value:
        raise InvalidValue(
            "expected at least one exception type name, got []; omit retry_on to retry any failure,"
            " or set max_attempts = 1 to never retry"
        )
    for item in value:
        if not isinstance(item, str) or not all(part.isidentifier() for part in item.split(".")):
            raise InvalidValue(
                f"expected exception type names such as 'ConnectionError' or 'mypackage.errors.FetchError',"
                f" got {show(item)}"
            )
    return tuple(value)


def journal_setting(value: Any) -> str | bool:
    """Check ``journal``: a file path, true for the default path, or false to run without a journal."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value.strip():
        _fail("a journal file path, true for the default path, or false to run without a journal", value)
    return value


FAILURE_KINDS_WITH_LIMITS = ("exception", "crash", "timeout", "payload")


def failure_limits(value: Any) -> tuple[tuple[str, int], ...]:
    """Check ``max_failures``: a table from failure kind to a whole number of failures >= 1."""
    if not isinstance(value, Mapping):
        _fail("a table such as { timeout = 2, crash = 1 }", value)
    limits = []
    for kind, limit in value.items():
        if kind not in FAILURE_KINDS_WITH_LIMITS:
            close = difflib.get_close_matches(str(kind), FAILURE_KINDS_WITH_LIMITS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InvalidValue(
                f"unknown failure kind {show(kind)}; expected one of {', '.join(FAILURE_KINDS_WITH_LIMITS)}{hint}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidValue(f"expected a whole number of failures >= 1 for {kind!r}, got {show(limit)}")
        limits.append((kind, limit))
    return tuple(sorted(limits))


def table(value: Any, expected: str = "a table") -> Mapping[str, Any]:
    """Check a table (a mapping with string keys)."""
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        _fail(expected, value)
    return value


def array(value: Any, expected: str = "an array") -> list[Any]:
    """Check an array; a Python tuple from a task source counts as one."""
    if not isinstance(value, (list, tuple)):
        _fail(expected, value)
    return list(value)


def read_key(
    problems: Problems,
    source: Mapping[str, Any],
    path: KeyPath,
    key: str,
    check: Callable[[Any], Any],
) -> Any:
    """Return the checked value of ``source[key]``; ``None`` when it is absent or invalid (the problem is recorded)."""
    if key not in source:
        return None
    try:
        return check(source[key])
    except InvalidValue as exc:
        problems.add((*path, key), str(exc))
        return None


# -- key lines ------------------------------------------------------------------


_HEADER = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_\-.\"' ]+?)\s*\]\]?\s*(#.*)?")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")
# Multi-line strings, and the single-line strings and comments that could
# contain their delimiters; matching all of them in one pass keeps them apart.
_LITERAL = re.compile(r'"""(?:[^\\]|\\[\s\S])*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*')


def _blank_multiline_string(match: re.Match[str]) -> str:
    literal = match.group()
    if literal.startswith(('"""', "'''")):
        # Keep the line breaks, so the lines after the string keep their numbers.
        return '""' + "\n" * literal.count("\n")
    return literal


@dataclass(slots=True)
class _Section:
    path: KeyPath
    line: int | None
    #: (line number, text) of the lines that start a key, value or comment inside the table.
    body: list[tuple[int, str]]


class KeyLines:
    """Best-effort lookup of the line that defines a key, for error messages.

    tomllib reports no positions, so this scans the text for table headers
    (counting ``[[tasks]]`` occurrences to number the array entries) and for
    ``key =`` lines inside a table. It skips the contents of multi-line strings
    and arrays, which is enough for ordinary files. :meth:`line_of` returns
    ``None`` when it cannot place a key.
    """

    def __init__(self, text: str) -> None:
        self._sections = [_Section((), None, [])]
        array_counts: dict[tuple[str, ...], int] = {}
        # Brackets and braces still open: inside a multi-line array, a line
        # such as `["x"]` is a value, not a table header.
        depth = 0

        skeleton = _LITERAL.sub(_blank_multiline_string, text)
        for number, line in enumerate(skeleton.splitlines(), start=1):
            header = _HEADER.fullmatch(line) if depth == 0 else None
            if header is not None:
                names = tuple(part.strip().strip("\"'") for part in header.group(2).split("."))
                if header.group(1) == "[[":
                    array_counts[names] = array_counts.get(names, 0) + 1
                path: list[str | int] = []
                for index, name in enumerate(names):
                    path.append(name)
                    if names[: index + 1] in array_counts:
                        path.append(array_counts[names[: index + 1]] - 1)
                self._sections.append(_Section(tuple(path), number, []))
                continue

            if depth == 0:
                self._sections[-1].body.append((number, line))
            code = _STRING.sub("", line).split("#", 1)[0]
            depth = max(0, depth + code.count("[") + code.count("{") - code.count("]") - code.count("}"))

    def line_of(self, path: KeyPath) -> int | None:
        """Return the line number that defines ``path`` or its nearest enclosing table, or ``None``."""
        best = self._sections[0]
        for section in self._sections:
            size = len(section.path)
            if size > len(best.path) and path[:size] == section.path:
                best = section

        rest = path[len(best.path) :]
        if not rest:
            return best.line
        if not isinstance(rest[0], str):
            return None

        key = re.escape(rest[0])
        pattern = re.compile(rf"\s*(?:{key}|\"{key}\"|'{key}')\s*[=.]")
        for number, line in best.body:
            if pattern.match(line):
                return number
        return best.line
