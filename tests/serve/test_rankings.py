"""gptcore.serve.rankings: the durable writer of the rankings file.

The crash cases are real where they can be: a subprocess killed (SIGKILL) in the middle of a
write, and a subprocess killed at a random moment while it appends large rankings in a loop.
Torn files are also written by hand, byte for byte, for the repair's two outcomes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytest.importorskip("starlette")  # gptcore.serve's package imports the server's dependencies

from gptcore._fileio import jsonl_records  # noqa: E402
from gptcore.serve.rankings import RankingWriter, repair_torn_tail  # noqa: E402


def _lines(path):
    return [obj for _, obj in jsonl_records(path)]


def _rec(i, size=0):
    return {"prompt": f"prompt {i}", "ranked": [f"best {i}" + "x" * size, f"worst {i}"]}


def test_appends_whole_lines_in_order(tmp_path):
    path = tmp_path / "r.jsonl"
    with RankingWriter(path) as w:
        for i in range(3):
            w.append(_rec(i))
        w.append({"prompt": "ünïcode ✓ \n newline", "ranked": ["a\"b", "c\\d"]})
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 4
    assert _lines(path) == [_rec(0), _rec(1), _rec(2),
                            {"prompt": "ünïcode ✓ \n newline", "ranked": ["a\"b", "c\\d"]}]
    with RankingWriter(path) as w:  # reopening appends; it never truncates whole lines
        w.append(_rec(9))
    assert _lines(path)[-1] == _rec(9) and len(_lines(path)) == 5


def test_each_append_is_fsynced_after_its_write(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    w = RankingWriter(path)
    calls = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, b: calls.append(("write", fd)) or real_write(fd, b))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", fd)) or real_fsync(fd))
    fd = w._fd
    w.append(_rec(0))
    w.close()
    assert calls == [("write", fd), ("fsync", fd)]


@pytest.mark.parametrize("tail, kept", [
    (b'{"prompt": "p", "ranked": ["a", "b', False),       # cut inside a string
    (b'{"prompt": "p", "ranked": ["a", "b"]', False),     # cut before the closing brace
    (b'{"prompt"', False),
    (b'{"prompt": "\xe2\x9c', False),                     # cut inside a UTF-8 character
    (b"{", False),
    (b'{"prompt": "p", "ranked": ["a", "b"]}', True),     # whole: only its newline is missing
])
@pytest.mark.parametrize("before", [b"", b'{"prompt": "old", "ranked": ["x", "y"]}\n'])
def test_torn_tail_is_repaired_before_the_next_append(tmp_path, tail, kept, before):
    path = tmp_path / "r.jsonl"
    path.write_bytes(before + tail)
    with RankingWriter(path) as w:
        assert w.repaired_bytes == (0 if kept else len(tail))
        assert path.read_bytes() == before + (tail + b"\n" if kept else b"")
        w.append(_rec(1))
    expected = ([json.loads(before)] if before else []) + ([json.loads(tail)] if kept else [])
    assert _lines(path) == expected + [_rec(1)]


@pytest.mark.parametrize("tail", [b"12", b"hello", b"\xe2\x9c", b" {"])
def test_a_tail_no_ranking_begins_with_is_refused_not_cut(tmp_path, tail):
    # not a line this writer cut short: the wrong file, most likely; it is left as it was
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line\n" + tail)
    with pytest.raises(ValueError, match="notes.txt: its last line .* not a rankings file"):
        RankingWriter(path)
    assert path.read_bytes() == b"first line\n" + tail


def test_a_tail_torn_while_open_is_repaired_by_the_next_append(tmp_path):
    # another process (or a previous crash not yet seen) leaves a torn line behind an open writer
    path = tmp_path / "r.jsonl"
    with RankingWriter(path) as w:
        w.append(_rec(0))
        with open(path, "ab") as f:
            f.write(b'{"prompt": "torn", "ran')
        w.append(_rec(1))
    assert _lines(path) == [_rec(0), _rec(1)]


def test_long_torn_tail_spanning_read_blocks(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"prompt": "a", "ranked": ["b", "c"]}\n' + b'{"prompt": "' + b"z" * 200_000)
    fd = os.open(path, os.O_RDWR)
    try:
        assert repair_torn_tail(fd) == 200_000 + len(b'{"prompt": "')
    finally:
        os.close(fd)
    assert _lines(path) == [{"prompt": "a", "ranked": ["b", "c"]}]


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from gptcore.serve.rankings import RankingWriter
    w = RankingWriter(sys.argv[1])
    w.append({"prompt": "first", "ranked": ["a", "b"]})
    if sys.argv[2] == "mid-write":
        real_write = os.write
        def write_half_then_die(fd, data):
            real_write(fd, bytes(data[: len(data) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
        os.write = write_half_then_die
        w.append({"prompt": "second", "ranked": ["c" * 1000, "d"]})
    else:
        print("ready", flush=True)
        i = 0
        while True:
            w.append({"prompt": "loop %d" % i, "ranked": ["e" * 400_000, "f"]})
            i += 1
""")


def _child(path, mode):
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode],
                            stdout=subprocess.PIPE, text=True)


def test_process_killed_mid_write_loses_only_that_ranking(tmp_path):
    path = tmp_path / "r.jsonl"
    proc = _child(path, "mid-write")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    data = path.read_bytes()
    assert not data.endswith(b"\n") and data.count(b"\n") == 1  # the torn half-line is there
    with RankingWriter(path) as w:
        w.append(_rec(2))
    assert _lines(path) == [{"prompt": "first", "ranked": ["a", "b"]}, _rec(2)]


def test_process_killed_at_a_random_moment_leaves_a_readable_file(tmp_path):
    path = tmp_path / "r.jsonl"
    proc = _child(path, "loop")
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3 + (os.getpid() % 7) * 0.03)  # a moment inside some 400 KB write or fsync
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    whole = path.read_bytes().count(b"\n")
    with RankingWriter(path) as w:
        w.append(_rec(3))
    lines = _lines(path)
    assert len(lines) == whole + 1 and lines[0]["prompt"] == "first" and lines[-1] == _rec(3)
    assert [x["prompt"] for x in lines[1:-1]] == [f"loop {i}" for i in range(whole - 1)]


def test_threads_never_interleave(tmp_path):
    path = tmp_path / "r.jsonl"
    w = RankingWriter(path)
    errors = []

    def work(t):
        try:
            for i in range(20):
                w.append(_rec(f"{t}-{i}", size=5000))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    assert not errors
    got = sorted(x["prompt"] for x in _lines(path))
    assert got == sorted(f"prompt {t}-{i}" for t in range(6) for i in range(20))


def test_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    w = RankingWriter(path)
    w.append(_rec(0))
    before = path.read_bytes()
    real_write = os.write

    def disk_full_after_a_few_bytes(fd, data):
        real_write(fd, bytes(data[:7]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full_after_a_few_bytes)
    with pytest.raises(OSError, match="No space"):
        w.append(_rec(1))
    monkeypatch.undo()
    assert path.read_bytes() == before
    w.append(_rec(2))
    w.close()
    assert _lines(path) == [_rec(0), _rec(2)]


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="path"):
        RankingWriter(3)
    with pytest.raises(IsADirectoryError, match="directory"):
        RankingWriter(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RankingWriter(tmp_path / "no" / "r.jsonl")
    w = RankingWriter(tmp_path / "r.jsonl")
    with pytest.raises(TypeError, match="record"):
        w.append(["not", "a", "dict"])
    with pytest.raises(ValueError, match="record"):
        w.append({"prompt": "p", "ranked": [float("nan"), "b"]})
    with pytest.raises(ValueError, match="record"):
        w.append({"prompt": "\ud800", "ranked": ["a", "b"]})
    w.close()
    assert (tmp_path / "r.jsonl").read_bytes() == b""  # nothing half-written by refused records
    with pytest.raises(ValueError, match="closed"):
        w.append(_rec(0))
