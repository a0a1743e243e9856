"""pytest configuration for gptcore's benchmark suites (pytest-benchmark).

Run them explicitly; they are not part of ``pytest`` (testpaths is ``tests``):

    pytest benchmarks/bench_ops_cpu.py --benchmark-json=bench_cpu.json
    python benchmarks/results_table.py bench_cpu.json      # markdown for RESULTS.md

Files named ``bench_*.py`` are collected here. The machine's load average is recorded before
and after the run (in the JSON's ``machine_info``), since timings taken while other processes
compete for the cores are not comparable.
"""

from __future__ import annotations

import os

import pytest


def pytest_collect_file(parent, file_path):
    # pytest collects test_*.py by default; explicitly named files it collects on its own.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_LOADAVG_START = None


def pytest_sessionstart(session):
    global _LOADAVG_START
    _LOADAVG_START = list(os.getloadavg())


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["loadavg_start"] = _LOADAVG_START
    machine_info["cpu_count"] = os.cpu_count()
    try:
        import gptcore

        machine_info["gptcore_threads"] = gptcore.get_num_threads()
    except ImportError:  # pragma: no cover
        pass


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["machine_info"]["loadavg_end"] = list(os.getloadavg())
