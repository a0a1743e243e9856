"""The fine-tuning demo's tasks (gptcore.train.tasks_demo): built from standard-library files the
pre-training corpus leaves out, valid task data, deterministic, nothing cut at 128 positions.
(The demo's table itself is a few minutes of training: benchmarks/RESULTS.md.)"""

from __future__ import annotations

from gptcore.data.tasks import LabelSpace, TaskEncoder, check_example
from gptcore.train.corpus import DEFAULT_CORPUS_BYTES, _stdlib_files
from gptcore.train.tasks_demo import _held_out_files, build_tasks


def test_demo_tasks_are_held_out_valid_and_deterministic():
    held = _held_out_files()
    assert held and not set(held) & set(_stdlib_files(DEFAULT_CORPUS_BYTES))
    tasks = build_tasks(n_train=40, n_test=24)
    assert build_tasks(n_train=40, n_test=24)["choice"][1].examples == tasks["choice"][1].examples
    specials = {"start": 257, "delim": 258, "extract": 259}
    for task, (train, test) in tasks.items():
        assert len(train) == 40 and len(test) == 24, task
        for data in (train, test):
            for ex, at in zip(data.examples, data.where):
                check_example(task, ex, at, True)
            enc = TaskEncoder(task, lambda t: list(t.encode("utf-8")), specials, 128)
            assert enc.count_truncated(data.examples) == 0, task
        labels = LabelSpace.from_data(train)
        labels.encode(test)  # every test label is one the training set has
        assert labels.n_out == (1 if task == "choice" else 2 if task == "entail" else 4)
    assert {len(ex["choices"]) for ex in tasks["choice"][0].examples} == {4}
