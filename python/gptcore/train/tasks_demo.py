"""The fine-tuning demo behind ``gptcore finetune`` (no data): does pre-training transfer?

Three labelled tasks are cut from Python standard-library sources that the pre-training corpus
(:func:`gptcore.train.corpus.default_corpus_dir`, a fixed few-MB subset of the same library) does
*not* contain, so no test example was seen during pre-training:

    choice    which of 4 lines comes next after 3 lines of a file (3 distractors: lines of
              other files)                                                       chance 25%
    entail    does snippet B (2 lines) continue snippet A (3 lines), or come from another file
                                                                                  chance 50%
    classify  which stdlib package a function (its first lines) comes from, among the 4
              packages with the most functions in the held-out files              chance 25%

A small byte-level model is pre-trained on the corpus once (cached under ~/.cache/gptcore, keyed
by its settings), then each task is fine-tuned in three ways, a few seeds each: (a) the
pre-trained model, task loss + 0.5 LM loss; (b) the same architecture from a random
initialisation, same labels, same recipe; (c) the pre-trained model without the LM loss. The
table gives test accuracy, mean +- std over seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import data as gdata
from .._fileio import write_atomic
from ..data.tasks import TaskData
from ..models.gpt import GPT
from .corpus import DEFAULT_CORPUS_BYTES, _cache_root, _stdlib_files, default_corpus_dir
from .finetune import FinetuneConfig, evaluate_task, finetune

__all__ = ["build_tasks", "pretrained_model", "run_demo", "DEMO_PRETRAIN", "DEMO_FINETUNE"]

# the pre-training run (gptcore train's settings; the cache key is made from these)
DEMO_PRETRAIN = dict(preset="tiny", steps=1500, batch_size=16, lr=3e-3, warmup=50, seed=1337)
# the fine-tuning recipe of the table: GPT-1's (3 epochs, warmup, decay, dropout, LM weight...)
# except the learning rate and batch, sized for a 0.1M-parameter model and 400 examples (at
# GPT-1's 6.25e-5 and 13 steps an epoch a model this small barely moves, pre-trained or not)
DEMO_FINETUNE = dict(lr=1e-3, batch_size=16, epochs=3)
N_TRAIN, N_TEST = 400, 400


# ---- task data from held-out standard-library files ------------------------------------------


def _held_out_files() -> List[str]:
    """Standard-library sources that the default pre-training corpus leaves out."""
    corpus = set(_stdlib_files(DEFAULT_CORPUS_BYTES))
    return sorted(f for f in _stdlib_files(10 ** 12) if f not in corpus)


def _lines(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return []
    return [ln.rstrip() for ln in text.splitlines()]


def _code_lines(lines: Sequence[str]) -> List[int]:
    """Indices of lines worth predicting: not comments, 8+ characters, at most 60 with their
    indentation (so that a line always fits in half of a 128-position context)."""
    return [i for i, ln in enumerate(lines)
            if len(ln.strip()) >= 8 and len(ln) <= 60 and not ln.strip().startswith("#")]


def _tail(lines: Sequence[str], budget: int) -> List[str]:
    """The last of ``lines`` that fit in ``budget`` characters together (at least one)."""
    out: List[str] = []
    for ln in reversed(lines):
        if out and sum(len(x) + 1 for x in out) + len(ln) > budget:
            break
        out.insert(0, ln)
    return out


def _choice_and_entail(files: Sequence[str], rng: np.random.Generator, n: int
                       ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Both built around one position of a file: the lines before it (as many of the last 3 as
    fit in 56 characters, so that nothing is cut at 128 positions) and the line there."""
    texts = {f: _lines(f) for f in files}
    texts = {f: ls for f, ls in texts.items() if len(ls) > 20}
    names = sorted(texts)
    pool = [(f, i) for f in names for i in _code_lines(texts[f])]
    choice: List[Dict[str, Any]] = []
    entail: List[Dict[str, Any]] = []
    while len(choice) < n or len(entail) < n:
        f = names[rng.integers(len(names))]
        ls = texts[f]
        i = int(rng.integers(3, len(ls) - 2))
        if i not in set(_code_lines(ls)) or not ls[i - 1].strip():
            continue
        ctx, nxt = _tail([x for x in ls[i - 3:i] if x.strip()], 56), ls[i]
        if sum(len(x) + 1 for x in ctx) > 60:
            continue  # one long line before: it would be cut
        others: List[str] = []
        while len(others) < 4:  # lines of other files: 3 distractors and a non-continuation
            g, j = pool[rng.integers(len(pool))]
            if g != f and texts[g][j] != nxt:
                others.append(texts[g][j])
        if len(choice) < n:
            right = int(rng.integers(4))
            options = others[:right] + [nxt] + others[right:3]
            choice.append({"context": "\n".join(ctx) + "\n", "choices": options, "label": right})
        if len(entail) < n:
            follows = bool(rng.integers(2))
            entail.append({"premise": "\n".join(ctx), "hypothesis": nxt if follows else others[3],
                           "label": "continues" if follows else "other"})
    return choice, entail


_DEF = re.compile(r"^(\s*)def \w+\(")


def _functions_by_package(files: Sequence[str]) -> Dict[str, List[str]]:
    """package -> the first lines (at most 120 characters) of each function its files define."""
    root = os.path.dirname(os.__file__)
    by_pkg: Dict[str, List[str]] = {}
    for f in files:
        rel = os.path.relpath(f, root).split(os.sep)
        if len(rel) < 2:
            continue  # a top-level module: no package
        ls = _lines(f)
        for i, ln in enumerate(ls):
            m = _DEF.match(ln)
            if m:
                body = [x[len(m.group(1)):] for x in ls[i:i + 6] if x.strip()]
                text = body[0]
                for x in body[1:]:
                    if len(text) + 1 + len(x) > 120:
                        break
                    text += "\n" + x
                by_pkg.setdefault(rel[0], []).append(text[:120])
    return by_pkg


def _functions(by_pkg: Dict[str, List[str]], packages: Sequence[str], rng: np.random.Generator,
               n: int) -> List[Dict[str, Any]]:
    per = n // len(packages)
    out = []
    for p in packages:
        funcs = by_pkg.get(p, [])
        pick = rng.choice(len(funcs), size=min(per, len(funcs)), replace=False)
        out += [{"text": funcs[i], "label": p} for i in pick]
    return [out[i] for i in rng.permutation(len(out))]


def build_tasks(seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST
                ) -> Dict[str, Tuple[TaskData, TaskData]]:
    """{task: (train, test)} built from held-out standard-library files (train and test come
    from disjoint halves of the files)."""
    files = _held_out_files()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    halves = ([files[i] for i in order[::2]], [files[i] for i in order[1::2]])
    made: Dict[str, List[List[Dict[str, Any]]]] = {"choice": [], "entail": [], "classify": []}
    funcs = [_functions_by_package(h) for h in halves]
    # the 4 packages with the most functions in the smaller of the two halves
    packages = sorted(sorted(funcs[0], key=lambda p: -min(len(funcs[0][p]), len(funcs[1].get(p, []))))[:4])
    for part, by_pkg, n in zip(halves, funcs, (n_train, n_test)):
        choice, entail = _choice_and_entail(part, rng, n)
        made["choice"].append(choice)
        made["entail"].append(entail)
        made["classify"].append(_functions(by_pkg, packages, rng, n))

    def as_data(task, exs, split):
        return TaskData(task, f"<demo {task} {split}>", exs,
                        [f"<demo {task} {split}>:{i + 1}" for i in range(len(exs))], True)

    return {t: (as_data(t, tr, "train"), as_data(t, te, "test")) for t, (tr, te) in made.items()}


# ---- the pre-trained model -------------------------------------------------------------------


def pretrained_model(progress: bool = True, settings: Optional[Dict[str, Any]] = None
                     ) -> Tuple[str, float]:
    """(checkpoint directory, final validation loss) of the demo's pre-trained model, trained
    once with ``settings`` (:class:`~gptcore.train.pretrain.TrainConfig` fields, default
    :data:`DEMO_PRETRAIN`) and cached under a key made from them."""
    from .pretrain import TrainConfig, train

    settings = DEMO_PRETRAIN if settings is None else settings
    corpus = default_corpus_dir(progress=progress)  # its name is a hash of the files it holds
    key = hashlib.sha1(json.dumps([settings, os.path.basename(corpus)],
                                  sort_keys=True).encode()).hexdigest()[:10]
    out = os.path.join(_cache_root(), f"finetune-demo-pretrain-{key}")
    done = os.path.join(out, "done.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            return os.path.join(out, "checkpoint"), float(json.load(f)["val_loss"])
    if progress:
        print(f"Pre-training the demo model once ({settings}) -> {out}", flush=True)
    res = train(TrainConfig(out=out, data=corpus, sample_tokens=0, eval_every=500,
                            progress=progress, overwrite=True, **settings))  # not done.json: redo
    write_atomic(done, [json.dumps({"val_loss": res["val_loss"]}).encode()])
    return os.path.join(out, "checkpoint"), float(res["val_loss"])


# ---- the table -------------------------------------------------------------------------------

_CONDITIONS = (("pre-trained, LM weight 0.5", True, 0.5),
               ("from scratch, LM weight 0.5", False, 0.5),
               ("pre-trained, LM weight 0", True, 0.0))
_CHANCE = {"choice": 0.25, "entail": 0.5, "classify": 0.25}


def run_demo(out: str = "gptcore-finetune-demo", seeds: int = 2, threads: Optional[int] = None,
             progress: bool = True) -> Dict[str, Any]:
    """Pre-train (cached), build the tasks, fine-tune every (task, condition, seed), print the
    table and write it to ``out``/results.md and results.json."""
    if threads:
        from .. import set_num_threads

        set_num_threads(threads)
    t0 = time.perf_counter()
    ckpt, val_loss = pretrained_model(progress)
    from ..io import load_pretrained

    pre = load_pretrained(ckpt)
    tok = gdata.get_tokenizer("byte")
    tasks = build_tasks()
    results: Dict[str, Dict[str, List[float]]] = {}
    for task, (train_data, test_data) in tasks.items():
        for name, pretrained, lam in _CONDITIONS:
            accs = []
            for s in range(seeds):
                base = pre if pretrained else GPT(pre.config, seed=1000 + s)
                cfg = FinetuneConfig(task=task, out=None, lm_weight=lam, seed=s, progress=False,
                                     **DEMO_FINETUNE)
                res = finetune(cfg, base=(base, tok), train=train_data)
                accs.append(evaluate_task(res["model"], test_data)["accuracy"])
            results.setdefault(task, {})[name] = accs
            if progress:
                print(f"{task:<9} {name:<28} test accuracy {_fmt(accs)}", flush=True)
    md = _table(results, seeds, val_loss, pre, {t: (len(a), len(b)) for t, (a, b) in tasks.items()})
    elapsed = time.perf_counter() - t0
    md += f"\n{len(tasks) * len(_CONDITIONS) * seeds} fine-tuning runs; {elapsed:.0f} s in all.\n"
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "results.md"), [md.encode()])
    write_atomic(os.path.join(out, "results.json"),
                 [json.dumps({"results": results, "pretrain": DEMO_PRETRAIN,
                              "finetune": DEMO_FINETUNE, "pretrain_val_loss": val_loss,
                              "elapsed_s": elapsed}, indent=2).encode()])
    if progress:
        print("\n" + md + f"(written to {os.path.join(out, 'results.md')})")
    return {"results": results, "markdown": md, "elapsed": elapsed}


def _fmt(accs: Sequence[float]) -> str:
    a = np.asarray(accs) * 100
    if len(a) < 2:  # one seed: no spread to report
        return f"{a.mean():.1f}"
    return f"{a.mean():.1f} +- {a.std(ddof=1):.1f}"


def _table(results, seeds, val_loss, model, sizes) -> str:
    names = [c[0] for c in _CONDITIONS]
    lines = [f"| task (train / test examples, chance) | {' | '.join(names)} |",
             "|---" * (len(names) + 1) + "|"]
    for task, row in results.items():
        n_tr, n_te = sizes[task]
        lines.append(f"| {task} ({n_tr} / {n_te}, {_CHANCE[task] * 100:.0f}%) | "
                     + " | ".join(_fmt(row[n]) for n in names) + " |")
    c = model.config
    spread = f"mean +- std over {seeds} fine-tuning seeds" if seeds > 1 else "one fine-tuning seed"
    return (f"Test accuracy (%), {spread}. Model: {c.n_layer} "
            f"layers, {c.n_embd} wide, {c.block_size} positions, byte-level; pre-trained "
            f"{DEMO_PRETRAIN['steps']} steps on the default stdlib corpus (val loss "
            f"{val_loss:.3f}). Fine-tuning: lr {DEMO_FINETUNE['lr']:g}, batch "
            f"{DEMO_FINETUNE['batch_size']}, {DEMO_FINETUNE['epochs']} epochs, other settings "
            "GPT-1's.\n\n" + "\n".join(lines) + "\n")
