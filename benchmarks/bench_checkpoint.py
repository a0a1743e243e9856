"""Loading a GPT-2 124M checkpoint: is it bound by the disk?

A random gpt2-size model is saved once (model.safetensors, 498 MB fp32, and an llm.c .bin) in a
temporary directory; then each way of reading it is timed next to the raw speed of reading the
same bytes with ``readinto`` into a preallocated buffer:

* ``raw read``: the file's bytes into one buffer (the floor: what any loader must move).
* ``read_weights``: parse and validate the header, memory-map the file (touches no data).
* ``materialise``: read_weights + one copy of every tensor into float32 NumPy buffers of the
  model's shapes (Conv1D weights transposed on the way): the loader's data movement.
* ``load_pretrained``: the whole thing, a ready gptcore.GPT (includes building the model).
* ``load_weights``: the same into an already built GPT's parameter memory.
* ``GPT(config)``: building an empty model alone, for comparison.

"warm" means the file is in the page cache (it was just written or read); "cold" drops the file's
pages with posix_fadvise(DONTNEED) before each run (only this file; other processes unaffected).

    python benchmarks/bench_checkpoint.py [--preset gpt2] [--reps 5]
    pytest benchmarks/bench_checkpoint.py           # pytest-benchmark timing of the warm loads
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import pytest

from gptcore import io as ck
from gptcore.io.pretrained import _model_state
from gptcore.io.safetensors import _parallel_copy
from gptcore.models import GPTConfig
from gptcore.models import GPT


def drop_cache(path: str) -> None:
    """Evict ``path``'s pages from the page cache (the file is fsync'ed, so they are clean)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: str, buf: bytearray) -> int:
    with open(path, "rb", buffering=0) as f:
        return f.readinto(buf)


def materialise(path: str) -> int:
    """read_weights + the loader's copy of every tensor into fresh float32 buffers."""
    cfg, state, _ = ck.read_weights(path)
    pairs = [(np.empty(arr.shape, np.float32), arr) for arr in state.values()]
    _parallel_copy(pairs)
    return sum(d.nbytes for d, _ in pairs)


def make_checkpoint(preset: str, directory: str):
    cfg = GPTConfig.preset(preset)
    model = GPT(cfg, seed=0)
    t = time.perf_counter()
    ck.save_pretrained(model, os.path.join(directory, "ckpt"))
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    ck.write_llmc_model(os.path.join(directory, "model.bin"), cfg, _model_state(model))
    llmc_save_s = time.perf_counter() - t
    return cfg, save_s, llmc_save_s


def median_time(fn, reps: int, before=None) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(preset: str = "gpt2", reps: int = 5) -> None:
    with tempfile.TemporaryDirectory() as d:
        cfg, save_s, llmc_save_s = make_checkpoint(preset, d)
        model = GPT(cfg, seed=1)
        st = os.path.join(d, "ckpt", "model.safetensors")
        binf = os.path.join(d, "model.bin")
        size = os.path.getsize(st)
        buf = bytearray(size)
        mb = size / 1e6
        rows = []

        def row(name, seconds, nbytes=size):
            rows.append((name, seconds, nbytes / seconds / 1e9))

        rows.append(("save_pretrained (write + fsync)", save_s, size / save_s / 1e9))
        rows.append(("write_llmc_model (write + fsync)", llmc_save_s,
                     os.path.getsize(binf) / llmc_save_s / 1e9))
        for cold in (False, True):
            tag = "cold" if cold else "warm"
            before = (lambda: drop_cache(st)) if cold else (lambda: raw_read(st, buf))
            row(f"raw read ({tag})", median_time(lambda: raw_read(st, buf), reps, before))
            row(f"read_weights, header + mmap ({tag})",
                median_time(lambda: ck.read_weights(os.path.join(d, "ckpt")), reps, before))
            row(f"materialise all tensors ({tag})",
                median_time(lambda: materialise(os.path.join(d, "ckpt")), reps, before))
            row(f"load_pretrained -> GPT ({tag})",
                median_time(lambda: ck.load_pretrained(os.path.join(d, "ckpt")), reps, before))
            row(f"load_weights into a built GPT ({tag})",
                median_time(lambda: ck.load_weights(model, os.path.join(d, "ckpt")), reps, before))
            bbuf = bytearray(os.path.getsize(binf))
            bbefore = (lambda: drop_cache(binf)) if cold else (lambda: raw_read(binf, bbuf))
            row(f"load_pretrained llm.c .bin ({tag})",
                median_time(lambda: ck.load_pretrained(binf), reps, bbefore), os.path.getsize(binf))
        row("GPT(config) alone (allocate + init)", median_time(lambda: GPT(cfg, seed=0), max(1, reps // 2)))
        print(f"\n{preset}: {cfg.num_parameters():,} parameters, model.safetensors {mb:.1f} MB, "
              f"median of {reps} runs, {os.cpu_count()} CPUs, loadavg {os.getloadavg()[0]:.2f}\n")
        print(f"| {'what':<42} | {'seconds':>8} | {'GB/s of the file':>16} |")
        print(f"|{'-' * 44}|{'-' * 10}|{'-' * 18}|")
        for name, s, gbps in rows:
            print(f"| {name:<42} | {s:8.3f} | {gbps:16.2f} |")


# ---- pytest-benchmark --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved():
    with tempfile.TemporaryDirectory() as d:
        cfg, _, _ = make_checkpoint("gpt2", d)
        yield d, cfg


def test_raw_read_warm(benchmark, saved):
    d, _ = saved
    st = os.path.join(d, "ckpt", "model.safetensors")
    buf = bytearray(os.path.getsize(st))
    benchmark.extra_info["bytes"] = len(buf)
    benchmark.pedantic(raw_read, args=(st, buf), rounds=5, warmup_rounds=1)


def test_materialise_warm(benchmark, saved):
    d, _ = saved
    benchmark.extra_info["bytes"] = os.path.getsize(os.path.join(d, "ckpt", "model.safetensors"))
    benchmark.pedantic(materialise, args=(os.path.join(d, "ckpt"),), rounds=5, warmup_rounds=1)


def test_load_pretrained_warm(benchmark, saved):
    d, cfg = saved
    model = benchmark.pedantic(ck.load_pretrained, args=(os.path.join(d, "ckpt"),), rounds=3,
                               warmup_rounds=1)
    assert model.config == cfg


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    run(args.preset, args.reps)
