"""Measure how much of the machine's CPU a CPU-bound batch keeps busy.

Runs ``--tasks`` tasks of ``plugins.cpu:burn`` with ``--millis`` of CPU time
each, one worker slot per core, and reports the tasks' own CPU seconds over
wall seconds times cores. Whole-run wall time is used, so worker start-up and
the tail of the batch count against batchrun.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40, help="number of tasks (default: 40)")
    parser.add_argument("--millis", type=int, default=250, help="CPU milliseconds per task (default: 250)")
    arguments = parser.parse_args()
    cores = os.cpu_count() or 1
    share, cpu_seconds, wall = measure(arguments.tasks, arguments.millis, cores)
    print(f"CPU use: {share:.1%} of {cores} cores ({cpu_seconds:.2f} task CPU seconds in {wall:.2f} s wall)")


if __name__ == "__main__":
    main()
