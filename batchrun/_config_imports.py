"""Import checks of ``module:function`` strings for :mod:`batchrun.config`."""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from batchrun.errors import ConfigError


class CallError(Exception):
    """Raised by _import_callable; the message is the problem text without the key."""


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _import_callable(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    if spec.count(":") != 1 or not _is_dotted_name(module_name) or not _is_dotted_name(attribute):
        hint = "write 'module:function', for example 'plugins.fake_api:fetch'"
        if ":" not in spec and _is_dotted_name(spec) and "." in spec:
            head, _, tail = spec.rpartition(".")
            hint = f"did you mean {head + ':' + tail!r}?"
        raise CallError(f"expected 'module:function', got {spec!r}; {hint}")

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            hint = (
                "check the module name, and that the module is in the config file's folder,"
                " the current folder or an installed package"
            )
        else:
            hint = "install the missing package"
        raise CallError(f"cannot import {spec!r}: {exc}; {hint}") from exc
    except Exception as exc:
        # Importing runs the user's module, which may raise anything. Report it
        # with the other problems instead of stopping the checks.
        raise CallError(f"cannot import {spec!r}: module {module_name!r} raised {type(exc).__name__}: {exc}") from exc

    target: Any = module
    names = attribute.split(".")
    for depth, name in enumerate(names):
        try:
            target = getattr(target, name)
        except AttributeError:
            owner = f"module {module_name!r}" if depth == 0 else repr(f"{module_name}:{'.'.join(names[:depth])}")
            public = [candidate for candidate in dir(target) if not candidate.startswith("_")]
            close = difflib.get_close_matches(name, public, n=1)
            hint = ""
            if close:
                suggestion = f"{module_name}:{'.'.join([*names[:depth], close[0]])}"
                hint = f"; did you mean {suggestion!r}?"
            raise CallError(f"cannot import {spec!r}: {owner} has no attribute {name!r}{hint}") from None

    if not callable(target):
        raise CallError(
            f"{spec!r} is not callable: it is a {type(target).__name__};"
            " point call at a function or a coroutine function"
        )
    return target


class CallChecker:
    """Checks ``module:function`` strings, remembering each result so a string is imported once."""

    def __init__(self) -> None:
        self._problems: dict[str, str | None] = {}

    def problem(self, spec: str) -> str | None:
        """Return why ``spec`` cannot be called, or ``None`` when it resolves to a callable."""
        if spec not in self._problems:
            try:
                _import_callable(spec)
            except CallError as exc:
                self._problems[spec] = str(exc)
            else:
                self._problems[spec] = None
        return self._problems[spec]


def resolve_callable(spec: str, *, where: str) -> Callable[..., Any]:
    """Import the object that ``spec`` (``"module:function"``) names and return it.

    :param spec: the module path and the attribute path, separated by one ``:``.
    :param where: what the message names as the source of ``spec``, for
        example ``"configs/batch.toml: tasks[0].call"``.
    :raises ConfigError: when ``spec`` is malformed, its module or attribute
        cannot be imported, or the object is not callable.
    """
    try:
        return _import_callable(spec)
    except CallError as exc:
        message = f"{where}: {exc}"
        raise ConfigError(message) from exc.__cause__


def add_import_paths(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Put each folder of ``paths`` at the front of ``sys.path``, in order, unless it is already there.

    A folder already on ``sys.path`` keeps its place, so imports that already
    worked keep resolving to the same modules.
    """
    present = {os.path.abspath(entry or os.curdir) for entry in sys.path if isinstance(entry, str)}
    added: list[str] = []
    for path in paths:
        folder = os.path.abspath(os.fspath(path))
        if folder not in present:
            present.add(folder)
            added.append(folder)
    sys.path[0:0] = added
