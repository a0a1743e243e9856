"""Turn pytest-benchmark JSON from bench_ops_cpu.py into the markdown table of RESULTS.md.

    pytest benchmarks/bench_ops_cpu.py --benchmark-json=bench_cpu.json
    python benchmarks/results_table.py bench_cpu.json [--stat median|min]

Each benchmark group holds one op at one size, timed for gptcore and for a baseline (the
float64 NumPy reference, or NumPy's float32 matmul for the sgemm rows). Times are the medians
over the rounds (or the minimum with ``--stat min``, the better estimate of the uncontended
time when other processes share the cores), in milliseconds; speed-up = baseline / gptcore.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _met(target, speedup):
    if not target:
        return ""
    if target.startswith(">="):
        return "yes" if speedup >= float(target[2:].strip().rstrip("x")) else "**no**"
    if target.startswith("within 5%"):
        return "yes" if speedup >= 1 / 1.05 else "**no**"
    return ""


def table(data: dict, stat: str = "median") -> str:
    groups = defaultdict(dict)
    order = []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if b["group"] not in groups:
            order.append(b["group"])
        groups[b["group"]][info["impl"]] = (b["stats"][stat] * 1e3, info)
    mi = data.get("machine_info", {})
    ci = data.get("commit_info", {})
    commit = (ci.get("id") or "")[:7] or _commit()
    if ci.get("dirty"):
        commit += " (+ uncommitted changes)"
    lines = [
        f"- CPU: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
        f"{mi.get('cpu_count', '?')} cores, gptcore threads: {mi.get('gptcore_threads', '?')}",
        f"- date: {data.get('datetime', '?')[:19].replace('T', ' ')} UTC, commit: {commit}",
        f"- load average (1/5/15 min) at start: "
        f"{', '.join(f'{x:.2f}' for x in mi.get('loadavg_start', []))}; at end: "
        f"{', '.join(f'{x:.2f}' for x in mi.get('loadavg_end', []))}",
        f"- statistic: {stat} over the rounds",
        "",
        "| op (forward + backward) | size | gptcore ms | baseline | baseline ms | speed-up | target | met |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for g in order:
        impls = groups[g]
        if "gptcore" not in impls:
            continue
        ours, info = impls["gptcore"]
        base_name = "reference" if "reference" in impls else "numpy"
        if base_name not in impls:
            continue
        base, _ = impls[base_name]
        speedup = base / ours
        label = {"reference": "reference (float64)", "numpy": "NumPy float32 matmul"}[base_name]
        op = info["op"] if info["op"] != "sgemm" else "sgemm (linear forward, no bias)"
        lines.append(f"| {op} | {info['size']} | {ours:.3f} | {label} | {base:.3f} | "
                     f"{speedup:.2f}x | {info.get('target') or ''} | {_met(info.get('target'), speedup)} |")
    return "\n".join(lines)


def main(argv) -> int:
    args = argv[1:]
    stat = "median"
    if "--stat" in args:
        i = args.index("--stat")
        stat = args[i + 1] if i + 1 < len(args) else ""
        del args[i:i + 2]
    if len(args) != 1 or stat not in ("median", "min", "mean"):
        print(__doc__)
        return 2
    with open(args[0]) as f:
        print(table(json.load(f), stat))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
