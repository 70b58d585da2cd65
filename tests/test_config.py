"""Tests of batchrun.config: reading, validating and expanding batch files."""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from batchrun import _config_imports
from batchrun._config_checks import KeyLines
from batchrun.config import BatchConfig, RunSettings, add_import_paths, load_config, resolve_callable
from batchrun.errors import ConfigError
from batchrun.models import RetrySettings


# Each test writes its own module under a new name, because Python caches
# imported modules by name across tests.
JOBS_SOURCE = '''
PULLED = []
CALLS = []
DATA = {"not": "callable"}


def work(*args, **kwargs):
    return args, kwargs


async def work_async(*args, **kwargs):
    return args, kwargs


class Jobs:
    @staticmethod
    def run():
        return None


def many(count, prefix="item"):
    CALLS.append(count)
    for index in range(count):
        PULLED.append(index)
        yield {"id": f"{prefix}-{index}", "call": __name__ + ":work", "kwargs": {"n": index}}


def tables(items):
    CALLS.append(len(items))
    for item in items:
        PULLED.append(item)
        yield item


def not_iterable():
    return 5
'''

_module_numbers = itertools.count()

TASK = """
[[tasks]]
id = "t"
call = "JOBS:work"
"""


@pytest.fixture(autouse=True)
def restore_import_state():
    """Undo the sys.path entries and the test modules that load_config adds."""
    saved_path = list(sys.path)
    saved_modules = set(sys.modules)
    yield
    sys.path[:] = saved_path
    for name in set(sys.modules) - saved_modules:
        if name.startswith("jobs_"):
            del sys.modules[name]


@pytest.fixture
def jobs(tmp_path):
    """Write a module of task functions next to the config and return its unique name."""
    name = f"jobs_{next(_module_numbers)}"
    (tmp_path / f"{name}.py").write_text(JOBS_SOURCE, encoding="utf-8")
    importlib.invalidate_caches()
    return name


@pytest.fixture
def write(make_config, jobs):
    """Write a config whose text names the jobs module as JOBS, and return its path."""

    def write_config(text, name="batch.toml"):
        return make_config(textwrap.dedent(text).replace("JOBS", jobs), name)

    return write_config


def config_error(path, **options) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, **options)
    return info.value


def single_problem(path, **options) -> str:
    error = config_error(path, **options)
    assert len(error.problems) == 1, error.problems
    return error.problems[0]


# -- defaults and the full contract -----------------------------------------------


def test_load_defaults(write, jobs, tmp_path):
    path = write(TASK)

    config = load_config(path)

    assert config.path == path
    assert config.root == tmp_path.resolve()
    assert config.run == RunSettings(
        name="batch", max_concurrent=os.cpu_count() or 1, timeout=None, timeout_grace=3.0, deadline=None, plugins=()
    )
    assert config.retry == RetrySettings()
    assert dict(config.plugin_settings) == {}
    [task] = config.iter_tasks()
    assert task.id == "t"
    assert task.call == f"{jobs}:work"
    assert task.args == ()
    assert dict(task.kwargs) == {}
    assert task.timeout is None
    assert task.retry == RetrySettings()


def test_load_full_contract(write, jobs):
    path = write(
        """
        [run]
        name = "demo"
        max_concurrent = 4
        timeout = 30.0
        timeout_grace = 3.5
        deadline = 600.0
        plugins = ["myteam.alerts"]

        [retry]
        policy = "fixed"
        max_attempts = 3
        delay = 0.2
        max_delay = 10.0
        jitter = false
        seed = 7
        retry_on = ["ConnectionError", "builtins.TimeoutError"]

        [plugins.alerts]
        url = "https://example.invalid/hook"

        [[tasks]]
        id = "fetch-1"
        call = "JOBS:work"
        args = [1, "two"]
        kwargs = { delay = 0.3, fail_attempts = 1 }
        max_attempts = 5
        timeout = 2.0
        """
    )

    config = load_config(path)

    assert config.run == RunSettings(
        name="demo", max_concurrent=4, timeout=30.0, timeout_grace=3.5, deadline=600.0, plugins=("myteam.alerts",)
    )
    assert config.retry == RetrySettings(
        policy="fixed",
        max_attempts=3,
        delay=0.2,
        max_delay=10.0,
        jitter=False,
        seed=7,
        retry_on=("ConnectionError", "builtins.TimeoutError"),
    )
    assert dict(config.plugin_settings["alerts"]) == {"url": "https://example.invalid/hook"}
    [task] = config.iter_tasks()
    assert task.id == "fetch-1"
    assert task.args == (1, "two")
    assert dict(task.kwargs) == {"delay": 0.3, "fail_attempts": 1}
    assert task.timeout == 2.0
    assert task.retry == RetrySettings(
        policy="fixed",
        max_attempts=5,
        delay=0.2,
        max_delay=10.0,
        jitter=False,
        seed=7,
        retry_on=("ConnectionError", "builtins.TimeoutError"),
    )


def test_load_accepts_integer_seconds(write):
    config = load_config(write("[run]\ntimeout = 5\ndeadline = 60\n" + TASK))

    assert config.run.timeout == 5.0
    assert isinstance(config.run.timeout, float)
    assert config.run.deadline == 60.0


def test_run_name_defaults_to_file_stem(write):
    config = load_config(write(TASK, name="nightly.toml"))

    assert config.run.name == "nightly"


def test_run_name_default_replaces_unsafe_characters(write):
    config = load_config(write(TASK, name="my batch (v2).toml"))

    assert config.run.name == "my-batch-v2"


def test_plugin_settings_kept_without_validation(write):
    config = load_config(write('[plugins.alerts]\nurl = 5\nnested = { a = [1] }\n\n[plugins.other]\n' + TASK))

    assert dict(config.plugin_settings["alerts"]) == {"url": 5, "nested": {"a": [1]}}
    assert dict(config.plugin_settings["other"]) == {}
    assert isinstance(config.plugin_settings, MappingProxyType)


def test_batch_config_without_file():
    config = BatchConfig(path=None, root=None, run=RunSettings(name="adhoc"), retry=RetrySettings())

    assert list(config.iter_tasks()) == []
    assert config.import_paths() == [os.getcwd()]


# -- import paths -----------------------------------------------------------------


def test_load_prepends_import_paths(write, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(TASK)
    sys.path[:] = [entry for entry in sys.path if entry not in ("", os.getcwd())]

    load_config(path)
    load_config(path)

    assert sys.path[:2] == [str(tmp_path.resolve()), str(elsewhere.resolve())]
    assert sys.path.count(str(tmp_path.resolve())) == 1


def test_import_paths_lists_config_folder_then_cwd(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    config = load_config(write(TASK))

    assert config.import_paths() == [str(tmp_path.resolve()), str(tmp_path.parent.resolve())]


def test_import_paths_lists_shared_folder_once(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write(TASK))

    assert config.import_paths() == [str(tmp_path.resolve())]


def test_add_import_paths_adds_each_folder_once(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"

    add_import_paths([first, second, first])
    add_import_paths([second])

    assert sys.path[:2] == [str(first), str(second)]
    assert sys.path.count(str(second)) == 1


# -- tasks ---------------------------------------------------------------------------


def test_task_kwargs_read_only(write):
    [task] = load_config(write(TASK + "kwargs = { a = 1 }\n")).iter_tasks()

    assert isinstance(task.kwargs, MappingProxyType)
    with pytest.raises(TypeError):
        task.kwargs["a"] = 2  # type: ignore[index]


def test_task_timeout_defaults_to_run_timeout(write):
    path = write(
        """
        [run]
        timeout = 30.0

        [[tasks]]
        id = "inherits"
        call = "JOBS:work"

        [[tasks]]
        id = "own"
        call = "JOBS:work"
        timeout = 2.0
        """
    )

    tasks = {task.id: task for task in load_config(path).iter_tasks()}

    assert tasks["inherits"].timeout == 30.0
    assert tasks["own"].timeout == 2.0


def test_task_retry_overrides_replace_defaults(write):
    path = write(
        """
        [retry]
        policy = "exponential"
        max_attempts = 3
        delay = 0.5
        seed = 1

        [[tasks]]
        id = "custom"
        call = "JOBS:work"
        policy = "fixed"
        max_attempts = 6
        max_delay = 4.0
        jitter = false
        seed = 9
        retry_on = ["OSError"]

        [[tasks]]
        id = "plain"
        call = "JOBS:work"
        """
    )

    tasks = {task.id: task for task in load_config(path).iter_tasks()}

    assert tasks["custom"].retry == RetrySettings(
        policy="fixed", max_attempts=6, delay=0.5, max_delay=4.0, jitter=False, seed=9, retry_on=("OSError",)
    )
    assert tasks["plain"].retry == RetrySettings(policy="exponential", max_attempts=3, delay=0.5, seed=1)


def test_call_accepts_coroutine_and_method(write):
    path = write(
        """
        [[tasks]]
        id = "async"
        call = "JOBS:work_async"

        [[tasks]]
        id = "method"
        call = "JOBS:Jobs.run"
        """
    )

    assert [task.id for task in load_config(path).iter_tasks()] == ["async", "method"]


def test_task_duplicate_id_rejected(write):
    path = write(TASK + TASK)

    problem = single_problem(path)

    assert problem == f"{path}:7: tasks[1].id: duplicate task id 't'; tasks[0] already uses it"


def test_task_call_imported_once_per_string(write, monkeypatch):
    imported = []
    original = _config_imports._import_callable

    def counting_import(spec):
        imported.append(spec)
        return original(spec)

    monkeypatch.setattr(_config_imports, "_import_callable", counting_import)
    path = write(
        """
        [[tasks]]
        id = "n-{n}"
        call = "JOBS:work"
        matrix = { n = [1, 2, 3, 4, 5] }

        [[tasks]]
        id = "other"
        call = "JOBS:work"
        """
    )

    config = load_config(path)

    assert len(list(config.iter_tasks())) == 6
    assert len(imported) == 1


# -- matrix ---------------------------------------------------------------------------


def test_matrix_expands_in_key_then_value_order(write):
    path = write(
        """
        [[tasks]]
        id = "t-{a}-{b}"
        call = "JOBS:work"
        matrix = { a = [1, 2], b = ["x", "y"] }
        """
    )

    ids = [task.id for task in load_config(path).iter_tasks()]

    assert ids == ["t-1-x", "t-1-y", "t-2-x", "t-2-y"]


def test_matrix_whole_field_keeps_value_type(write):
    path = write(
        """
        [[tasks]]
        id = "burn-{n}"
        call = "JOBS:work"
        matrix = { n = [1, 2], size = [[3, 4]] }
        args = ["{n}", ["{size}", { deep = "{n}" }]]
        kwargs = { seed = "{n}", size = "{size}", nested = { list = ["{n}"] } }
        """
    )

    first, second = load_config(path).iter_tasks()

    assert first.id == "burn-1"
    assert first.args == (1, [[3, 4], {"deep": 1}])
    assert dict(first.kwargs) == {"seed": 1, "size": [3, 4], "nested": {"list": [1]}}
    assert dict(second.kwargs)["seed"] == 2


def test_matrix_formats_other_strings(write):
    path = write(
        """
        [[tasks]]
        id = "job-{n:03d}"
        call = "JOBS:work"
        matrix = { n = [7] }
        kwargs = { label = "n={n}", padded = "{n:>3}", literal = "{{n}}", plain = "no fields" }
        """
    )

    [task] = load_config(path).iter_tasks()

    assert task.id == "job-007"
    assert dict(task.kwargs) == {"label": "n=7", "padded": "  7", "literal": "{n}", "plain": "no fields"}


def test_matrix_id_is_always_a_string(write):
    path = write('[[tasks]]\nid = "{n}"\ncall = "JOBS:work"\nmatrix = { n = [1, 2] }\n')

    assert [task.id for task in load_config(path).iter_tasks()] == ["1", "2"]


def test_matrix_tasks_do_not_share_values(write):
    path = write('[[tasks]]\nid = "t-{n}"\ncall = "JOBS:work"\nmatrix = { n = [1, 2], v = [[0]] }\nargs = ["{v}"]\n')

    first, second = load_config(path).iter_tasks()
    first.args[0].append(1)

    assert second.args == ([0],)


def test_task_without_matrix_keeps_braces(write):
    [task] = load_config(write(TASK + 'kwargs = { text = "{not a template}" }\n')).iter_tasks()

    assert task.kwargs["text"] == "{not a template}"


MATRIX_ERRORS = [
    pytest.param(
        'id = "b-{m}"\nmatrix = { n = [1] }',
        "tasks[0].id: template 'b-{m}' refers to unknown matrix key 'm'; matrix keys are 'n'",
        id="unknown-key-in-id",
    ),
    pytest.param(
        'id = "b-{n}"\nmatrix = { n = [1] }\nkwargs = { x = ["{q}"] }',
        "tasks[0].kwargs.x[0]: template '{q}' refers to unknown matrix key 'q'; matrix keys are 'n'",
        id="unknown-key-in-kwargs",
    ),
    pytest.param(
        'id = "b-{n}"\nmatrix = { n = [1] }\nargs = ["{"]',
        "tasks[0].args[0]: invalid template '{': single '{' encountered in format string;"
        " write '{{' and '}}' for literal braces",
        id="unmatched-brace",
    ),
    pytest.param(
        'id = "b-{}"\nmatrix = { n = [1] }',
        "tasks[0].id: template 'b-{}' has a positional field; name a matrix key, such as '{n}'",
        id="positional-field",
    ),
    pytest.param(
        'id = "b"\nmatrix = { n = [1, 2] }',
        "tasks[0].id: id 'b' is the same for all 2 matrix combinations; put matrix keys in it, such as 'b-{n}'",
        id="id-without-field",
    ),
    pytest.param(
        'id = "b-{n}"\nmatrix = { n = [1, 2], m = [1, 2] }',
        "tasks[0].id: duplicate task id 'b-1': the matrix gives it to several combinations;"
        " put every matrix key in the id template",
        id="id-missing-a-key",
    ),
    pytest.param(
        'id = "b-{n}"',
        "tasks[0].id: template 'b-{n}' needs a matrix, but this task has none; add a matrix table,"
        " or write '{{' and '}}' for literal braces",
        id="template-without-matrix",
    ),
    pytest.param(
        'id = "b-{n}"\nmatrix = { n = [] }',
        "tasks[0].matrix.n: expected a non-empty list of values, got []",
        id="empty-values",
    ),
    pytest.param(
        'id = "b-{n}"\nmatrix = { n = 3 }',
        "tasks[0].matrix.n: expected a non-empty list of values, got 3",
        id="values-not-a-list",
    ),
    pytest.param(
        'id = "b"\nmatrix = {}',
        "tasks[0].matrix: expected a table of value lists such as { n = [1, 2] }, got {}",
        id="empty-matrix",
    ),
    pytest.param(
        'id = "b-{n}"\nmatrix = { "not-ident" = [1] }',
        "tasks[0].matrix: expected matrix keys that are identifiers (letters, digits and '_'), got 'not-ident'",
        id="key-not-identifier",
    ),
    pytest.param(
        'id = "b-{n:d}"\nmatrix = { n = ["x"] }',
        "tasks[0].id: cannot fill in template 'b-{n:d}' with n='x': ValueError:"
        " Unknown format code 'd' for object of type 'str'",
        id="format-fails",
    ),
    pytest.param(
        'id = "{n}"\nmatrix = { n = [""] }',
        "tasks[0].id: template '{n}' gives an empty id for n=''",
        id="empty-id",
    ),
]


@pytest.mark.parametrize(("lines", "expected"), MATRIX_ERRORS)
def test_matrix_error_names_key(write, lines, expected):
    path = write(f'[[tasks]]\ncall = "JOBS:work"\n{lines}\n')

    problem = single_problem(path)

    assert problem.startswith(str(path))
    assert problem.endswith(f": {expected}")


def test_matrix_duplicate_of_explicit_task_rejected(write):
    path = write(
        """
        [[tasks]]
        id = "burn-2"
        call = "JOBS:work"

        [[tasks]]
        id = "burn-{n}"
        call = "JOBS:work"
        matrix = { n = [1, 2, 3] }
        """
    )

    problem = single_problem(path)

    assert problem.endswith("tasks[1].id: duplicate task id 'burn-2'; tasks[0] already uses it")


# -- sources ---------------------------------------------------------------------------


def test_source_tasks_follow_explicit_tasks(write, jobs):
    path = write(TASK + '\n[[sources]]\ncall = "JOBS:many"\nkwargs = { count = 2 }\n')

    tasks = list(load_config(path).iter_tasks())

    assert [task.id for task in tasks] == ["t", "item-0", "item-1"]
    assert tasks[1].call == f"{jobs}:work"
    assert dict(tasks[2].kwargs) == {"n": 1}


def test_source_waits_for_explicit_tasks(write, jobs):
    path = write(TASK + '\n[[sources]]\ncall = "JOBS:many"\nkwargs = { count = 1000 }\n')
    config = load_config(path)
    module = sys.modules[jobs]

    first = next(config.iter_tasks())

    assert first.id == "t"
    assert module.CALLS == []
    assert module.PULLED == []


def test_source_pulls_one_item_at_a_time(write, jobs):
    path = write('[[sources]]\ncall = "JOBS:many"\nargs = [1000]\n')
    tasks = load_config(path).iter_tasks()
    module = sys.modules[jobs]

    next(tasks)
    assert module.PULLED == [0]
    next(tasks)
    assert module.PULLED == [0, 1]


def test_iter_tasks_returns_fresh_iterator(write, jobs):
    config = load_config(write(TASK + '\n[[sources]]\ncall = "JOBS:many"\nkwargs = { count = 2 }\n'))

    first = [task.id for task in config.iter_tasks()]
    second = [task.id for task in config.iter_tasks()]

    assert first == second == ["t", "item-0", "item-1"]
    assert sys.modules[jobs].CALLS == [2, 2]


def test_source_tasks_get_defaults_and_overrides(write):
    path = write(
        """
        [run]
        timeout = 9.0

        [retry]
        max_attempts = 4

        [[sources]]
        call = "JOBS:tables"
        kwargs = { items = [
            { id = "a", call = "JOBS:work" },
            { id = "b", call = "JOBS:work", timeout = 1.0, max_attempts = 2 },
        ] }
        """
    )

    first, second = load_config(path).iter_tasks()

    assert (first.timeout, first.retry.max_attempts) == (9.0, 4)
    assert (second.timeout, second.retry.max_attempts) == (1.0, 2)


def test_source_matrix_expanded(write):
    path = write(
        """
        [[sources]]
        call = "JOBS:tables"
        kwargs = { items = [{ id = "m-{n}", call = "JOBS:work", matrix = { n = [1, 2] }, kwargs = { n = "{n}" } }] }
        """
    )

    tasks = list(load_config(path).iter_tasks())

    assert [(task.id, task.kwargs["n"]) for task in tasks] == [("m-1", 1), ("m-2", 2)]


def test_source_invalid_item_names_key(write):
    path = write(
        """
        [[sources]]
        call = "JOBS:tables"
        kwargs = { items = [{ id = "ok", call = "JOBS:work" }, { id = "bad", call = "JOBS:work", timeout = -5 }] }
        """
    )
    tasks = load_config(path).iter_tasks()

    assert next(tasks).id == "ok"
    with pytest.raises(ConfigError) as info:
        next(tasks)

    assert str(info.value) == f"{path}: sources[0][1].timeout: expected a positive number of seconds, got -5"


SOURCE_ITEM_ERRORS = [
    pytest.param('"just a string"', "sources[0][0]: expected a table of task keys, got 'just a string'", id="not-table"),
    pytest.param('{ call = "JOBS:work" }', "sources[0][0]: missing required key 'id'; give each task a unique id", id="no-id"),
    pytest.param(
        '{ id = "x", call = "JOBS:work", tiemout = 1 }',
        "sources[0][0]: unknown key 'tiemout'; did you mean 'timeout'?",
        id="unknown-key",
    ),
    pytest.param(
        '{ id = "x", call = "JOBS:nope" }',
        "sources[0][0].call: cannot import 'JOBS:nope': module 'JOBS' has no attribute 'nope'",
        id="bad-call",
    ),
    pytest.param(
        '{ id = "t", call = "JOBS:work" }',
        "sources[0][0].id: duplicate task id 't'; a [[tasks]] entry already uses it",
        id="duplicate-of-explicit",
    ),
]


@pytest.mark.parametrize(("item", "expected"), SOURCE_ITEM_ERRORS)
def test_source_item_error_raised_when_reached(write, jobs, item, expected):
    path = write(TASK + f'\n[[sources]]\ncall = "JOBS:tables"\nkwargs = {{ items = [{item}] }}\n')
    config = load_config(path)

    with pytest.raises(ConfigError) as info:
        list(config.iter_tasks())

    assert str(info.value) == f"{path}: {expected.replace('JOBS', jobs)}"


def test_source_duplicate_across_sources_rejected(write):
    path = write(
        """
        [[sources]]
        call = "JOBS:many"
        kwargs = { count = 2 }

        [[sources]]
        call = "JOBS:many"
        kwargs = { count = 3 }
        """
    )
    tasks = load_config(path).iter_tasks()

    with pytest.raises(ConfigError) as info:
        list(tasks)

    assert str(info.value) == f"{path}: sources[1][0].id: duplicate task id 'item-0'; sources[0][0] already uses it"


def test_source_returning_non_iterable_rejected(write, jobs):
    config = load_config(write('[[sources]]\ncall = "JOBS:not_iterable"\n'))

    with pytest.raises(ConfigError) as info:
        list(config.iter_tasks())

    expected = f"sources[0].call: expected '{jobs}:not_iterable' to return an iterable of task tables, got 5"
    assert str(info.value) == f"{config.path}: {expected}"


def test_source_call_checked_at_load(write, jobs):
    path = write('[[sources]]\ncall = "JOBS:mnay"\n')

    problem = single_problem(path)

    assert problem == (
        f"{path}:2: sources[0].call: cannot import '{jobs}:mnay': module '{jobs}' has no attribute 'mnay';"
        f" did you mean '{jobs}:many'?"
    )


def test_source_table_errors_reported_at_load(write):
    path = write('[[sources]]\ncall = "JOBS:many"\nargs = 5\nkwarg = {}\n')

    problems = config_error(path).problems

    assert problems == [
        f"{path}:3: sources[0].args: expected an array of positional arguments, got 5",
        f"{path}:4: sources[0]: unknown key 'kwarg'; did you mean 'kwargs'?",
    ]


# -- command-line overrides ----------------------------------------------------------


def test_cli_max_concurrent_overrides_file(write):
    config = load_config(write("[run]\nmax_concurrent = 4\n" + TASK), max_concurrent=2)

    assert config.run.max_concurrent == 2


def test_cli_max_attempts_overrides_every_task(write):
    path = write(
        """
        [retry]
        max_attempts = 3

        [[tasks]]
        id = "own"
        call = "JOBS:work"
        max_attempts = 5

        [[sources]]
        call = "JOBS:tables"
        kwargs = { items = [{ id = "sourced", call = "JOBS:work", max_attempts = 7 }] }
        """
    )

    config = load_config(path, max_attempts=1)

    assert config.retry.max_attempts == 1
    assert [task.retry.max_attempts for task in config.iter_tasks()] == [1, 1]


def test_cli_plugins_follow_file_plugins(write):
    config = load_config(write('[run]\nplugins = ["a"]\n' + TASK), extra_plugins=["b", "c"])

    assert config.run.plugins == ("a", "b", "c")


CLI_ERRORS = [
    pytest.param({"max_concurrent": 0}, "--max-concurrent: expected an integer >= 1, got 0", id="concurrent-zero"),
    pytest.param({"max_concurrent": 2.5}, "--max-concurrent: expected an integer >= 1, got 2.5", id="concurrent-float"),
    pytest.param({"max_attempts": -1}, "--max-attempts: expected an integer >= 1, got -1", id="attempts-negative"),
    pytest.param({"max_attempts": True}, "--max-attempts: expected an integer >= 1, got True", id="attempts-bool"),
    pytest.param(
        {"extra_plugins": ["a"]}, "-p: plugin 'a' is already listed in [run].plugins; remove one", id="plugin-in-file"
    ),
    pytest.param({"extra_plugins": ["b", "b"]}, "-p: plugin 'b' is given twice; remove one", id="plugin-twice"),
    pytest.param(
        {"extra_plugins": [""]}, "-p: expected a plugin module path or entry-point name, got ''", id="plugin-empty"
    ),
]


@pytest.mark.parametrize(("options", "expected"), CLI_ERRORS)
def test_cli_option_error_names_option(write, options, expected):
    path = write('[run]\nplugins = ["a"]\n' + TASK)

    assert single_problem(path, **options) == expected


# -- value errors -----------------------------------------------------------------------

SECTION_ERRORS = [
    ("[run]\nmax_concurrent = 0", "[run].max_concurrent: expected an integer >= 1, got 0"),
    ("[run]\nmax_concurrent = 2.0", "[run].max_concurrent: expected an integer >= 1, got 2.0"),
    ("[run]\nmax_concurrent = true", "[run].max_concurrent: expected an integer >= 1, got True"),
    ('[run]\nmax_concurrent = "4"', "[run].max_concurrent: expected an integer >= 1, got '4'"),
    ("[run]\ntimeout = -5", "[run].timeout: expected a positive number of seconds, got -5"),
    ("[run]\ntimeout = 0", "[run].timeout: expected a positive number of seconds, got 0"),
    ("[run]\ntimeout = nan", "[run].timeout: expected a positive number of seconds, got nan"),
    ("[run]\ntimeout = inf", "[run].timeout: expected a positive number of seconds, got inf"),
    ('[run]\ntimeout = "30"', "[run].timeout: expected a positive number of seconds, got '30'"),
    ("[run]\ntimeout = true", "[run].timeout: expected a positive number of seconds, got True"),
    ("[run]\ntimeout_grace = -1.0", "[run].timeout_grace: expected a number of seconds >= 0, got -1.0"),
    ("[run]\ndeadline = 0", "[run].deadline: expected a positive number of seconds, got 0"),
    ("[run]\ndeadline = -inf", "[run].deadline: expected a positive number of seconds, got -inf"),
    (
        '[run]\nname = "a/b"',
        "[run].name: expected a name made of ASCII letters, digits, '.', '_' and '-', usable as a file name,"
        " got 'a/b'",
    ),
    (
        '[run]\nname = ".."',
        "[run].name: expected a name made of ASCII letters, digits, '.', '_' and '-', usable as a file name,"
        " got '..'",
    ),
    (
        "[run]\nname = 5",
        "[run].name: expected a name made of ASCII letters, digits, '.', '_' and '-', usable as a file name, got 5",
    ),
    ('[run]\nplugins = "alerts"', "[run].plugins: expected a list of non-empty strings, got 'alerts'"),
    ('[run]\nplugins = [""]', "[run].plugins: expected a list of non-empty strings, got [''] containing ''"),
    ('[run]\nplugins = ["a", "a"]', "[run].plugins: plugin 'a' is listed twice; remove one"),
    ('[retry]\npolicy = ""', "[retry].policy: expected a non-empty string, got ''"),
    ("[retry]\nmax_attempts = 0", "[retry].max_attempts: expected an integer >= 1, got 0"),
    ("[retry]\nmax_attempts = 2.5", "[retry].max_attempts: expected an integer >= 1, got 2.5"),
    ("[retry]\nmax_attempts = 2.0", "[retry].max_attempts: expected an integer >= 1, got 2.0"),
    ("[retry]\nmax_attempts = true", "[retry].max_attempts: expected an integer >= 1, got True"),
    ("[retry]\ndelay = -0.1", "[retry].delay: expected a number of seconds >= 0, got -0.1"),
    ("[retry]\nmax_delay = inf", "[retry].max_delay: expected a number of seconds >= 0, got inf"),
    ("[retry]\ndelay = 5.0\nmax_delay = 1.0", "[retry].max_delay: expected a number of seconds >= delay (5.0), got 1.0"),
    ("[retry]\ndelay = 20", "[retry].delay: expected a number of seconds <= max_delay (10.0), got 20.0"),
    ("[retry]\njitter = 1", "[retry].jitter: expected true or false, got 1"),
    ("[retry]\nseed = 1.5", "[retry].seed: expected an integer, got 1.5"),
    ("[retry]\nseed = true", "[retry].seed: expected an integer, got True"),
    (
        '[retry]\nretry_on = "ConnectionError"',
        "[retry].retry_on: expected a list of exception type names such as ['ConnectionError'], got 'ConnectionError'",
    ),
    (
        '[retry]\nretry_on = ["not a name"]',
        "[retry].retry_on: expected exception type names such as 'ConnectionError' or"
        " 'mypackage.errors.FetchError', got 'not a name'",
    ),
    (
        "[retry]\nretry_on = []",
        "[retry].retry_on: expected at least one exception type name, got []; omit retry_on to retry any failure,"
        " or set max_attempts = 1 to never retry",
    ),
    ("run = 5", "[run]: expected a table [run], got 5"),
    (
        'plugins = ["alerts"]',
        "plugins: expected [plugins.<name>] tables of plugin settings, got ['alerts'];"
        " list the plugins to load in [run].plugins",
    ),
    ("[plugins]\nalerts = 1", "[plugins.alerts]: expected a table of plugin settings, got 1"),
]


@pytest.mark.parametrize(("section", "expected"), SECTION_ERRORS)
def test_section_value_error_names_key(write, section, expected):
    path = write(section + "\n" + TASK)

    problem = single_problem(path)

    assert problem.startswith(f"{path}:")
    assert problem.endswith(f": {expected}")


TASK_KEY_ERRORS = [
    ("timeout = -5", "tasks[0].timeout: expected a positive number of seconds, got -5"),
    ("timeout = nan", "tasks[0].timeout: expected a positive number of seconds, got nan"),
    ("max_attempts = 0", "tasks[0].max_attempts: expected an integer >= 1, got 0"),
    ("max_attempts = 2.0", "tasks[0].max_attempts: expected an integer >= 1, got 2.0"),
    ("delay = 20", "tasks[0].delay: expected a number of seconds <= max_delay (10.0), got 20.0"),
    ("max_delay = 0.1", "tasks[0].max_delay: expected a number of seconds >= delay (0.2), got 0.1"),
    ('jitter = "yes"', "tasks[0].jitter: expected true or false, got 'yes'"),
    ('policy = ""', "tasks[0].policy: expected a non-empty string, got ''"),
    ('args = "x"', "tasks[0].args: expected an array of positional arguments, got 'x'"),
    ("kwargs = [1]", "tasks[0].kwargs: expected a table of keyword arguments, got [1]"),
    ("tiemout = 1", "tasks[0]: unknown key 'tiemout'; did you mean 'timeout'?"),
    ("matrix = [1]", "tasks[0].matrix: expected a table of value lists such as { n = [1, 2] }, got [1]"),
]


@pytest.mark.parametrize(("line", "expected"), TASK_KEY_ERRORS)
def test_task_value_error_names_key(write, line, expected):
    path = write(TASK + line + "\n")

    problem = single_problem(path)

    assert problem == f"{path}:5: {expected}"


TASK_TABLE_ERRORS = [
    ('[[tasks]]\ncall = "JOBS:work"', "tasks[0]: missing required key 'id'; give each task a unique id"),
    ('[[tasks]]\nid = ""\ncall = "JOBS:work"', "tasks[0].id: expected a non-empty string, got ''"),
    ('[[tasks]]\nid = 5\ncall = "JOBS:work"', "tasks[0].id: expected a non-empty string, got 5"),
    ('[[tasks]]\nid = "t"', "tasks[0]: missing required key 'call'; set it to 'module:function'"),
    ('[[tasks]]\nid = "t"\ncall = 5', "tasks[0].call: expected a non-empty string, got 5"),
    ("tasks = [5]", "tasks[0]: expected a table of task keys, got 5"),
    ("[tasks]\nid = 't'", "tasks: expected [[tasks]] tables, got {'id': 't'}"),
    ("sources = 5", "sources: expected [[sources]] tables, got 5"),
    ("sources = [5]", "sources[0]: expected a table with keys 'call', 'args' and 'kwargs', got 5"),
    ("[[sources]]\nargs = []", "sources[0]: missing required key 'call'; set it to 'module:function'"),
]


@pytest.mark.parametrize(("text", "expected"), TASK_TABLE_ERRORS)
def test_task_table_error_names_key(write, text, expected):
    path = write(text + "\n")

    problem = single_problem(path)

    assert problem.startswith(str(path))
    assert problem.endswith(f": {expected}")


CALL_ERRORS = [
    pytest.param(
        "JOBS.work",
        "expected 'module:function', got 'JOBS.work'; did you mean 'JOBS:work'?",
        id="dot-instead-of-colon",
    ),
    pytest.param(
        "JOBS:work:again",
        "expected 'module:function', got 'JOBS:work:again'; write 'module:function',"
        " for example 'plugins.fake_api:fetch'",
        id="two-colons",
    ),
    pytest.param(
        "work",
        "expected 'module:function', got 'work'; write 'module:function', for example 'plugins.fake_api:fetch'",
        id="no-colon",
    ),
    pytest.param(
        "JOBS:",
        "expected 'module:function', got 'JOBS:'; write 'module:function', for example 'plugins.fake_api:fetch'",
        id="no-function",
    ),
    pytest.param(
        "missing_module_for_test:work",
        "cannot import 'missing_module_for_test:work': No module named 'missing_module_for_test'; check the module"
        " name, and that the module is in the config file's folder, the current folder or an installed package",
        id="module-not-found",
    ),
    pytest.param(
        "JOBS:wrk",
        "cannot import 'JOBS:wrk': module 'JOBS' has no attribute 'wrk'; did you mean 'JOBS:work'?",
        id="attribute-not-found",
    ),
    pytest.param(
        "JOBS:Jobs.rnu",
        "cannot import 'JOBS:Jobs.rnu': 'JOBS:Jobs' has no attribute 'rnu'; did you mean 'JOBS:Jobs.run'?",
        id="nested-attribute-not-found",
    ),
    pytest.param(
        "JOBS:DATA",
        "'JOBS:DATA' is not callable: it is a dict; point call at a function or a coroutine function",
        id="not-callable",
    ),
]


@pytest.mark.parametrize(("call", "expected"), CALL_ERRORS)
def test_call_error_names_value_and_fix(write, jobs, call, expected):
    path = write(f'[[tasks]]\nid = "t"\ncall = "{call}"\n')

    problem = single_problem(path)

    assert problem == f"{path}:3: tasks[0].call: {expected.replace('JOBS', jobs)}"


def test_call_module_that_raises_reported(write, tmp_path):
    (tmp_path / "broken_jobs_module.py").write_text("raise RuntimeError('boom at import')\n", encoding="utf-8")
    path = write('[[tasks]]\nid = "t"\ncall = "broken_jobs_module:work"\n')

    problem = single_problem(path)

    assert problem == (
        f"{path}:3: tasks[0].call: cannot import 'broken_jobs_module:work':"
        " module 'broken_jobs_module' raised RuntimeError: boom at import"
    )


def test_call_missing_dependency_reported(write, tmp_path):
    (tmp_path / "needs_dependency.py").write_text("import not_installed_dependency\n", encoding="utf-8")
    path = write('[[tasks]]\nid = "t"\ncall = "needs_dependency:work"\n')

    problem = single_problem(path)

    assert problem.endswith(
        "tasks[0].call: cannot import 'needs_dependency:work': No module named 'not_installed_dependency';"
        " install the missing package"
    )


def test_resolve_callable_returns_object(jobs, tmp_path):
    add_import_paths([tmp_path])

    function = resolve_callable(f"{jobs}:work", where="here")

    assert function(1, a=2) == ((1,), {"a": 2})


def test_resolve_callable_error_names_where(jobs, tmp_path):
    add_import_paths([tmp_path])

    with pytest.raises(ConfigError) as info:
        resolve_callable(f"{jobs}:nothing", where="batch.toml: tasks[3].call")

    assert str(info.value) == f"batch.toml: tasks[3].call: cannot import '{jobs}:nothing': module '{jobs}' has no attribute 'nothing'"


# -- unknown keys -----------------------------------------------------------------------

UNKNOWN_KEYS = [
    pytest.param("taks = []", "unknown top-level key 'taks'; did you mean [tasks]?", id="top-level-typo"),
    pytest.param(
        "colour = 1",
        "unknown top-level key 'colour'; valid tables are [run], [retry], [tasks], [sources], [plugins]",
        id="top-level-unrelated",
    ),
    pytest.param("max_concurrent = 4", "unknown top-level key 'max_concurrent'; move it under [run]", id="run-key-at-top"),
    pytest.param("delay = 4", "unknown top-level key 'delay'; move it under [retry]", id="retry-key-at-top"),
    pytest.param(
        "[run]\nmax_concurent = 2", "[run]: unknown key 'max_concurent'; did you mean 'max_concurrent'?", id="run"
    ),
    pytest.param(
        "[retry]\nmax_attemps = 3", "[retry]: unknown key 'max_attemps'; did you mean 'max_attempts'?", id="retry"
    ),
    pytest.param(
        "[retry]\nwhatever = 3",
        "[retry]: unknown key 'whatever'; valid keys are 'policy', 'max_attempts', 'delay', 'max_delay', 'jitter',"
        " 'seed', 'retry_on', 'max_failures'",
        id="retry-unrelated",
    ),
]


@pytest.mark.parametrize(("text", "expected"), UNKNOWN_KEYS)
def test_unknown_key_suggests_valid_key(write, text, expected):
    path = write(text + "\n" + TASK)

    problem = single_problem(path)

    assert problem.startswith(f"{path}:")
    assert problem.endswith(f": {expected}")


# -- file errors --------------------------------------------------------------------------


def test_file_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    error = config_error("configs/missing.toml")

    assert str(error) == f"configs/missing.toml: config file not found (looked in {os.getcwd()}); check the path"
    assert error.path == "configs/missing.toml"


def test_file_is_directory(tmp_path):
    error = config_error(tmp_path)

    assert str(error) == f"{tmp_path}: expected a TOML file, got a directory"


def test_file_unreadable(make_config, monkeypatch):
    path = make_config(TASK)

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    # chmod cannot make a file unreadable for root, so deny the read itself.
    monkeypatch.setattr(Path, "read_bytes", deny)
    error = config_error(path)

    assert str(error) == f"{path}: cannot read the config file: Permission denied"


def test_file_invalid_toml_names_line_and_column(make_config):
    path = make_config('[run]\nname = "a" b\n')

    error = config_error(path)

    assert str(error) == (
        f"{path}: invalid TOML at line 2, column 12: expected newline or end of document after a statement"
    )


def test_file_invalid_toml_at_end(make_config):
    path = make_config("[run]\nname =")

    assert str(config_error(path)) == f"{path}: invalid TOML at the end of the file: invalid value"


def test_file_not_utf8(tmp_path):
    path = tmp_path / "batch.toml"
    path.write_bytes(b'[run]\nname = "\xff"\n')

    error = config_error(path)

    assert str(error) == f"{path}: invalid TOML: the file is not UTF-8 (byte 14: invalid start byte)"


def test_file_with_byte_order_mark_loads(write, tmp_path):
    path = write(TASK)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())

    assert [task.id for task in load_config(path).iter_tasks()] == ["t"]


@pytest.mark.parametrize("text", ["", "[run]\nname = 'x'\n", "tasks = []\nsources = []\n"], ids=["empty", "run", "lists"])
def test_batch_without_tasks_rejected(make_config, text):
    path = make_config(text)

    problem = single_problem(path)

    assert problem == f"{path}: the batch has no tasks; add a [[tasks]] table or a [[sources]] table"


# -- collecting and sorting problems ---------------------------------------------------


def test_load_sorts_problems_by_key(write):
    tasks = "".join(f'[[tasks]]\nid = "t{index}"\ncall = "JOBS:work"\ntimeout = {index - 20}\n' for index in range(12))
    path = write('[run]\ntimeout = -1\n\n[retry]\ndelay = -1\n' + tasks)

    error = config_error(path)

    keys = [problem.split(": ")[1] for problem in error.problems]
    assert keys == ["[retry].delay", "[run].timeout", *(f"tasks[{index}].timeout" for index in range(12))]
    assert str(error) == "\n".join(error.problems)
    assert error.path == str(path)


def test_load_names_relative_path_as_given(write, tmp_path, monkeypatch):
    write(TASK + "timeout = 0\n")
    monkeypatch.chdir(tmp_path)

    problem = single_problem("batch.toml")

    assert problem == "batch.toml:5: tasks[0].timeout: expected a positive number of seconds, got 0"


def test_load_line_numbers_follow_tables(write):
    path = write(
        """
        # A comment line.
        [run]
        timeout = 1

        [retry]
        max_attemps = 3

        [[tasks]]
        id = "a"
        call = "JOBS:work"

        [[tasks]]
        call = "JOBS:work"

        [[tasks]]
        id = "c"
        call = "JOBS:work"
        timeout = -5
        """
    )

    problems = config_error(path).problems

    assert problems == [
        f"{path}:7: [retry]: unknown key 'max_attemps'; did you mean 'max_attempts'?",
        f"{path}:13: tasks[1]: missing required key 'id'; give each task a unique id",
        f"{path}:19: tasks[2].timeout: expected a positive number of seconds, got -5",
    ]


# -- key lines -----------------------------------------------------------------------------


def test_key_lines_find_keys_in_tables():
    lines = KeyLines('[run]\ntimeout = 1\n\n[[tasks]]\nid = "a"\n\n[[tasks]]\n"id" = "b"\ntimeout=2\n')

    assert lines.line_of(("run",)) == 1
    assert lines.line_of(("run", "timeout")) == 2
    assert lines.line_of(("tasks", 0, "id")) == 5
    assert lines.line_of(("tasks", 1, "id")) == 8
    assert lines.line_of(("tasks", 1, "timeout")) == 9


def test_key_lines_fall_back_to_table_header():
    lines = KeyLines('[[tasks]]\nid = "a"\n')

    assert lines.line_of(("tasks", 0, "call")) == 1


def test_key_lines_unknown_position_is_none():
    lines = KeyLines('[[sources]]\ncall = "m:f"\n')

    assert lines.line_of(("sources", 0, 3, "id")) is None
    assert lines.line_of(("run", "timeout")) is None


def test_key_lines_skip_multiline_values():
    text = textwrap.dedent(
        '''
        [[tasks]]
        id = "a"
        kwargs = { text = """
        [[tasks]]
        timeout = 1
        """ }
        args = [
            ["x"],
            [1, 2],
        ]
        timeout = 3

        [[tasks]]
        id = "b"
        '''
    )
    lines = KeyLines(text)

    assert lines.line_of(("tasks", 0, "timeout")) == 12
    assert lines.line_of(("tasks", 1, "id")) == 15


def test_key_lines_sub_tables_and_dotted_keys():
    lines = KeyLines('run.timeout = 1\n\n[[tasks]]\nid = "a"\n\n[tasks.kwargs]\nseed = 3\n')

    assert lines.line_of(("run", "timeout")) == 1
    assert lines.line_of(("tasks", 0, "kwargs", "seed")) == 7
    assert lines.line_of(("tasks", 0, "id")) == 4


def test_key_lines_inline_tasks_array():
    lines = KeyLines('tasks = [\n  { id = "a" },\n]\n')

    assert lines.line_of(("tasks", 0, "id")) == 1


# -- failure limits -----------------------------------------------------------------------


def test_max_failures_reads_limits_per_kind(write):
    path = write('[retry]\nmax_failures = { timeout = 2, crash = 1 }\n' + TASK)

    config = load_config(path)

    assert config.retry.failure_limit("timeout") == 2
    assert config.retry.failure_limit("crash") == 1
    assert config.retry.failure_limit("exception") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("{ crahs = 1 }", "unknown failure kind 'crahs'; expected one of exception, crash, timeout, payload; did you mean 'crash'?"),
        ("{ crash = 0 }", "expected a whole number of failures >= 1 for 'crash', got 0"),
        ("{ crash = true }", "expected a whole number of failures >= 1 for 'crash', got True"),
        ("3", "expected a table such as { timeout = 2, crash = 1 }, got 3"),
    ],
)
def test_max_failures_rejects_invalid_limits(write, value, expected):
    path = write(f"[retry]\nmax_failures = {value}\n" + TASK)

    problem = single_problem(path)

    assert "[retry].max_failures" in problem
    assert problem.endswith(expected)


def test_matrix_too_large_rejected(write):
    values = ", ".join(str(number) for number in range(500))
    path = write(f'[[tasks]]\nid = "t-{{a}}-{{b}}"\ncall = "JOBS:work"\nmatrix = {{ a = [{values}], b = [{values}] }}\n')

    problem = single_problem(path)

    assert "tasks[0].matrix" in problem
    assert "the matrix makes 250,000 tasks, more than the 100,000" in problem
    assert "[[sources]]" in problem


def test_source_that_raises_is_named(write, jobs, tmp_path):
    (tmp_path / "raising_source_module.py").write_text(
        f"def tasks():\n    yield {{'id': 'a', 'call': '{jobs}:work'}}\n    raise RuntimeError('source broke')\n",
        encoding="utf-8",
    )
    path = write('[[sources]]\ncall = "raising_source_module:tasks"\n')
    config = load_config(path)
    tasks = config.iter_tasks()

    next(tasks)
    with pytest.raises(ConfigError) as caught:
        next(tasks)

    assert "sources[0]" in str(caught.value)
    assert "'raising_source_module:tasks' raised RuntimeError after producing 1 task tables: source broke" in str(caught.value)
