"""InstructGPT's pipeline end to end on the CPU, with a reward nobody can fake
(``gptcore instruct-demo``).

The task: finish a line of Python. A prompt is up to three lines of a standard-library file that
pre-training never saw, then the start of a one-statement line cut somewhere after its first
``(`` (at least 6 characters before its end); the answer is what the model writes next, up to
and including its first newline::

    prompt   "_day0 = datetime(1, 1, 1)\ndef _try(fmt):\n    try:\n        return _day0.strftime(f"
    answer   "mt) == '0001'\n"                                   (the file's own line)

The checked property (the "labeler"; nothing learned): the finished line -- the prompt's last
line plus the answer up to its newline -- ends within ``max_new`` bytes and parses on its own
(``ast.parse(line.strip())``): brackets closed, strings ended, valid syntax. The demo's
pre-trained model manages it for about a quarter of its samples (temperature 1), the SFT model
for about half: room to improve both ways.

Every stage goes through its public API, as a user would run it:

1. the pre-trained model: :func:`gptcore.train.tasks_demo.pretrained_model` (cached);
2. SFT (:func:`gptcore.train.sft.sft`) on demonstrations: the file's real rest of the line;
3. rankings: ``k`` answers per prompt sampled from the SFT model, ranked by the labeler --
   passing answers first; among equals (the documented tie-break) the one closer to the file's
   real rest of the line (``difflib`` ratio) first; then sample order. Duplicates are dropped (a
   prompt left with one answer is skipped). Written as ``rankings.jsonl`` in the format of the
   /rank page of ``gptcore serve`` (plus a "passes" list, which the readers ignore);
4. the reward model (:func:`gptcore.train.reward.train_reward`) from the SFT model on 90% of the
   ranked prompts; its accuracy on the held-out 10% (all pairs, and the pairs whose answers
   differ in the property) is reported;
5. PPO (:func:`gptcore.train.ppo.ppo`) against the reward model with a KL penalty to the SFT
   model, rollouts ending at their newline; its per-step reward, KL and true rate are plotted;
6. DPO (:func:`gptcore.train.dpo.dpo`) on the same rankings' pairs;
7. evaluation on prompts from the other half of the held-out files, for every model: ``samples``
   answers per prompt at temperature 1, the property's rate, the reward model's mean score, and
   KL(model || SFT) estimated as the mean over those answers of log p_model - log p_SFT (nats per
   answer, summed over its tokens as sampled).

Stages 2-7 run once per seed (default 3; the pre-trained model and the prompts are shared), and
the table gives mean +- std over the seeds.

Output in ``out``: ``results.md`` (the table), ``results.json``, ``ppo_curve.png`` (when
matplotlib is installed), the prompts (``sft.jsonl``, ``ppo_prompts.jsonl``, ``eval.jsonl``),
and per seed ``seed-<i>/``: ``rankings.jsonl``, ``rankings_heldout.jsonl`` and every stage's run
directory (``sft/``, ``reward/``, ``ppo/``, ``dpo/``).
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import re
import shutil
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._fileio import atomic_file, write_atomic
from .._progress import Progress, format_duration
from ..generate import generate
from ..io import load_pretrained
from ._logprobs import Policy, pack
from .checkpoint import checkpoint_tokenizer
from .dpo import DPOConfig, dpo
from .ppo import PPOConfig, ppo
from .reward import RewardConfig, train_reward
from .sft import SFTConfig, sft
from .tasks_demo import DEMO_PRETRAIN, _held_out_files, _lines, pretrained_model

__all__ = ["DemoConfig", "QUICK", "line_prompts", "completed_line", "passes", "rank",
           "sample_answers", "answer_logprobs", "evaluate_model", "property_pair_accuracy",
           "plot_ppo", "run_demo"]

NEWLINE = "\n"


class DemoConfig(dict):
    """The demo's sizes (a dict with defaults; ``DemoConfig(n_sft=100)`` overrides some)."""

    DEFAULTS = dict(
        max_new=32,          # completion budget (bytes = tokens for the byte-level model)
        n_sft=2000,          # demonstrations
        n_rank=1500,         # prompts sampled for the labeler
        k=4,                 # answers sampled per ranked prompt
        rm_holdout=0.1,      # share of ranked prompts held out for the reward model's accuracy
        n_ppo_prompts=1024,  # prompts PPO samples rollouts from
        ppo_steps=60,
        ppo_batch=32,        # rollouts per PPO step
        kl_coef=0.1,         # PPO's beta
        dpo_beta=0.1,
        dpo_epochs=1,
        n_eval=200,          # held-out prompts
        samples=4,           # samples per held-out prompt
        seed=0,
    )

    def __init__(self, **overrides: Any):
        unknown = sorted(set(overrides) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"DemoConfig: unknown settings {unknown}; known: "
                             f"{sorted(self.DEFAULTS)}")
        super().__init__({**self.DEFAULTS, **overrides})
        for name, v in self.items():
            number = (isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v))
            if name in ("kl_coef", "dpo_beta"):
                ok, want = number and v > 0, "a finite number > 0"
            elif name == "rm_holdout":
                ok, want = number and 0 < v < 1, "a number in (0, 1)"
            else:
                low = 0 if name == "seed" else 2 if name == "k" else 1
                ok, want = isinstance(v, int) and not isinstance(v, bool) and v >= low, \
                    f"an int >= {low}" + (" (a ranking needs 2 answers)" if name == "k" else "")
            if not ok:
                raise ValueError(f"{name}: expected {want}, got {v!r}")


# the tiny version `--quick` and the test run: every stage, a few seconds each
QUICK = dict(n_sft=64, n_rank=48, k=3, n_ppo_prompts=32, ppo_steps=3, ppo_batch=8, n_eval=16,
             samples=2)
# its pre-training (cached like the full demo's, under its own key)
QUICK_PRETRAIN = dict(DEMO_PRETRAIN, steps=100)


# ---- prompts and the checked property ----------------------------------------------------------


_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try,
             ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Match)


def _parses(text: str) -> bool:
    try:
        with warnings.catch_warnings():  # "invalid escape sequence" and the like
            warnings.simplefilter("ignore")
            ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _statement_lines(path: str) -> Tuple[List[int], List[str]]:
    """The lines of a source file that hold one whole simple statement (an assignment, a call, a
    return...) and nothing else -- no part of a longer statement, no comment -- with a ``(``, 12
    to 60 characters long with their indentation: (their indices, the file's lines)."""
    lines = _lines(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse("\n".join(lines))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return [], lines
    out = []
    for node in ast.walk(tree):
        if (not isinstance(node, ast.stmt) or isinstance(node, _COMPOUND)
                or node.lineno != node.end_lineno):
            continue
        line = lines[node.lineno - 1]
        if (12 <= len(line) <= 60 and node.col_offset == len(line) - len(line.lstrip())
                and node.end_col_offset == len(line) and "(" in line):
            out.append(node.lineno - 1)
    return sorted(out), lines


def line_prompts(files: Sequence[str], n: int, seed: int, max_new: int = 32,
                 max_prompt: int = 95, min_rest: int = 6) -> List[Dict[str, str]]:
    """``n`` prompts ``{"prompt", "completion"}`` cut from ``files``: up to three lines before
    a whole-statement line (see :func:`_statement_lines`), then that line cut after its first
    ``(``, at least ``min_rest`` characters before its end (a cut next to the end asks little
    more than a closing bracket), where the cut line does not parse yet. The completion is the
    rest of the line and its newline, at most ``max_new`` characters; the prompt keeps its last
    ``max_prompt`` characters (the defaults fill the demo model's 128 positions with the
    end-of-text token). The same arguments give the same prompts; no prompt repeats."""
    if not files:
        raise ValueError("files: no source files to cut prompts from")
    rng = np.random.default_rng(seed)
    found: Dict[str, Tuple[List[int], List[str]]] = {}
    out: List[Dict[str, str]] = []
    seen = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 1000:
            raise ValueError(f"files: found only {len(out)} of the {n} prompts asked for")
        f = files[int(rng.integers(len(files)))]
        if f not in found:
            found[f] = _statement_lines(f)
        where, ls = found[f]
        if not where:
            continue
        i = where[int(rng.integers(len(where)))]
        line = ls[i]
        first = max(line.index("(") + 1, len(line) - (max_new - 1))  # the rest fits the budget
        last = len(line) - min_rest
        if first > last:
            continue
        cut = int(rng.integers(first, last + 1))
        if _parses(line[:cut].strip()):
            continue  # the cut line is already whole (``f(x).ba``): nothing to finish
        context = [x for x in ls[max(0, i - 3):i] if x.strip()]
        prompt = (NEWLINE.join(context) + NEWLINE if context else "") + line[:cut]
        prompt = prompt[-max_prompt:]
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "completion": line[cut:] + NEWLINE})
    return out


def completed_line(prompt: str, completion: str) -> Optional[str]:
    """The prompt's last line finished by the completion, or None when the completion does not
    end the line (no newline within it)."""
    head, nl, _ = completion.partition(NEWLINE)
    if not nl:
        return None
    return prompt.rpartition(NEWLINE)[2] + head


def passes(prompt: str, completion: str) -> bool:
    """The checked property: the completion ends the line, and the line parses on its own as
    Python (``ast.parse``: syntax only, so that ``return f(x)`` counts outside a function)."""
    line = completed_line(prompt, completion)
    return line is not None and _parses(line.strip())


def _similarity(answer: str, reference: str) -> float:
    """How close an answer's first line is to the file's real rest of the line (difflib's
    ratio: 0 nothing in common .. 1 the same)."""
    return difflib.SequenceMatcher(None, answer.partition(NEWLINE)[0],
                                   reference.partition(NEWLINE)[0], autojunk=False).ratio()


def rank(prompt: str, answers: Sequence[str], reference: str) -> Tuple[List[str], List[bool]]:
    """The labeler: ``answers`` without duplicates, best first -- passing ones before failing ones,
    then closer to ``reference`` (the file's real completion) first, then in the order given.
    Returns (ranked answers, whether each passes)."""
    unique = list(dict.fromkeys(answers))
    keyed = sorted(((not passes(prompt, a), -_similarity(a, reference), i, a)
                    for i, a in enumerate(unique)))
    return [a for *_, a in keyed], [not k[0] for k in keyed]


# ---- sampling and log-probabilities ------------------------------------------------------------


def sample_answers(model, tokenizer, prompts: Sequence[str], n: int, max_new: int, seed: int,
                   batch: int = 256, progress: str = "") -> List[List[Tuple[str, List[int]]]]:
    """``n`` answers per prompt, drawn at temperature 1: each the sampled tokens up to and
    including the first that holds a newline or is the end-of-text token (or all ``max_new``),
    as ``(text, token ids)`` -- the text without end-of-text, the ids exactly as sampled (what
    the log-probabilities are taken of). ``progress``: a progress bar's label (none if empty)."""
    eot = getattr(tokenizer, "eot_token", None)
    ids = [[int(t) for t in tokenizer.encode(p)] for p in prompts for _ in range(n)]
    answers: List[Tuple[str, List[int]]] = []
    bar = Progress(len(ids), progress, unit="answers", enabled=bool(progress))
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        # no tokenizer: nothing stops early, every row gets max_new tokens, cut here
        out = generate(model, chunk, max_new, temperature=1.0, seed=seed + s)
        for p, row in zip(chunk, out):
            gen = [int(t) for t in row[len(p):len(p) + max_new]]
            end = next((j + 1 for j, t in enumerate(gen)
                        if t == eot or NEWLINE in tokenizer.decode([t])), len(gen))
            gen = gen[:end]
            answers.append((tokenizer.decode([t for t in gen if t != eot]), gen))
        bar.update(len(chunk))
    bar.close()
    return [answers[i * n:(i + 1) * n] for i in range(len(prompts))]


def answer_logprobs(model, tokenizer, prompts: Sequence[str], answer_ids: Sequence[Sequence[int]]
                    ) -> np.ndarray:
    """log p(answer | prompt) under ``model`` (float64, one per pair), summed over the answer's
    token ids as sampled (:class:`gptcore.train._logprobs.Policy`, as DPO and PPO score)."""
    batch = pack([tokenizer.encode(p) for p in prompts], [list(a) for a in answer_ids],
                 model.config.block_size, where="answers")
    return Policy(model).sequence_logprobs(batch, batch_size=64)


# ---- evaluation ---------------------------------------------------------------------------------


def evaluate_model(model, reference, tokenizer, items: Sequence[Dict[str, str]], samples: int,
                   max_new: int, seed: int, reward=None, progress: str = "") -> Dict[str, Any]:
    """The property's rate and KL(model || reference) on ``items`` (prompts and the files' real
    completions), ``samples`` answers per prompt at temperature 1 (:func:`sample_answers`). KL
    is estimated as the mean over those answers of log p_model - log p_reference (nats per
    answer); "closeness" is the answers' mean difflib ratio to the file's real rest of the line
    (the labeler's tie-break), "length" their mean length in characters. Each value is
    ``(mean, standard error over prompts)`` (a prompt's samples averaged first). With ``reward``
    (a :class:`~gptcore.train.reward.RewardModel`) the mean reward-model score too.
    ``progress``: the sampling progress bar's label (none if empty)."""
    prompts = [it["prompt"] for it in items]
    answers = sample_answers(model, tokenizer, prompts, samples, max_new, seed, progress=progress)
    flat_p = [p for p in prompts for _ in range(samples)]
    texts = [t for row in answers for t, _ in row]
    ids = [i for row in answers for _, i in row]
    ok = np.array([passes(p, t) for p, t in zip(flat_p, texts)], np.float64)
    refs = [it["completion"] for it in items for _ in range(samples)]
    close = np.array([_similarity(t, r) for t, r in zip(texts, refs)])
    kl = (answer_logprobs(model, tokenizer, flat_p, ids)
          - answer_logprobs(reference, tokenizer, flat_p, ids))
    res: Dict[str, Any] = {
        "rate": _mean_se(ok, samples), "kl": _mean_se(kl, samples),
        "closeness": _mean_se(close, samples),
        "length": float(np.mean([len(t) for t in texts])),
        "examples": [{"prompt": p, "answer": t, "passes": bool(o)}
                     for p, t, o in list(zip(flat_p, texts, ok))[:8 * samples]]}
    if reward is not None:
        res["reward"] = _mean_se(np.asarray(reward.score(flat_p, texts), np.float64), samples)
    return res


def _mean_se(values: np.ndarray, per: int) -> Tuple[float, float]:
    """(mean, standard error over prompts) of per-sample values grouped ``per`` to a prompt."""
    by_prompt = np.asarray(values, np.float64).reshape(-1, per).mean(1)
    se = by_prompt.std(ddof=1) / math.sqrt(len(by_prompt)) if len(by_prompt) > 1 else 0.0
    return float(by_prompt.mean()), float(se)


def property_pair_accuracy(reward, rankings: Sequence[Dict[str, Any]]) -> Tuple[float, int]:
    """How often ``reward`` scores the passing answer above the failing one, over the pairs of
    ``rankings`` (labeler records with "passes") whose two answers differ in the property; and
    how many such pairs there are. (The reward model's own held-out accuracy counts every pair,
    tie-break pairs included.)"""
    right = []
    for r in rankings:
        s = reward.score([r["prompt"]] * len(r["ranked"]), r["ranked"])
        ok = r["passes"]
        right += [bool(s[i] > s[j]) if ok[i] else bool(s[j] > s[i])
                  for i in range(len(ok)) for j in range(i + 1, len(ok)) if ok[i] != ok[j]]
    return (float(np.mean(right)) if right else float("nan")), len(right)


# ---- the pipeline -------------------------------------------------------------------------------


def _write_jsonl(path: str, records: Sequence[Dict[str, Any]]) -> str:
    write_atomic(path, [(json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8")
                        for r in records])
    return path


def _label(model, tokenizer, items: Sequence[Dict[str, str]], cfg: DemoConfig, seed: int,
           progress: bool) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The labeler's rankings of ``k`` answers per prompt of ``items`` (see the module doc), as
    ``{"prompt", "ranked", "passes"}`` records (the reward model and DPO ignore "passes"), and a
    summary: prompts labelled and kept, the answers' pass rate, duplicates dropped."""
    answers = sample_answers(model, tokenizer, [it["prompt"] for it in items], cfg["k"],
                             cfg["max_new"], seed, progress="answers to rank" if progress else "")
    rankings, n_pass, n_dup, n_mixed, n_bad = [], 0, 0, 0, 0
    eot = getattr(tokenizer, "eot_token", None)
    for it, row in zip(items, answers):
        # an answer whose tokens are not text (a byte-level model's invalid UTF-8) cannot be
        # written as a ranked answer: its text would read back as other tokens
        texts = [t for t, ids in row if tokenizer.encode(t) == [i for i in ids if i != eot]]
        n_bad += len(row) - len(texts)
        ranked, ok = rank(it["prompt"], texts, it["completion"])
        n_pass += sum(passes(it["prompt"], t) for t in texts)
        n_dup += len(texts) - len(ranked)
        if len(ranked) >= 2:  # (all k answers the same: nothing to rank)
            rankings.append({"prompt": it["prompt"], "ranked": ranked, "passes": ok})
            n_mixed += any(ok) and not all(ok)
    return rankings, {"prompts": len(items), "kept": len(rankings), "mixed": n_mixed,
                      "answer_rate": n_pass / (len(items) * cfg["k"]), "duplicates": n_dup,
                      "not_text": n_bad}


# Each stage's recipe, sized for the 0.1M-parameter demo model. The stages' defaults are
# InstructGPT's, for models a thousand times larger (at SFT's 5e-5 this model barely moves). PPO
# and DPO: 1e-4 rather than 3e-4, measured on one full run -- at 3e-4 PPO reached the same true
# rate at twice the KL, and DPO a lower rate at a higher KL.
SFT_RECIPE = dict(lr=1e-3, epochs=1, batch_size=16)
REWARD_RECIPE = dict(lr=3e-4, epochs=2, batch_size=8)
PPO_RECIPE = dict(lr=1e-4, value_lr=1e-3, minibatch_size=16, ppo_epochs=4)
DPO_RECIPE = dict(lr=1e-4, batch_size=16)


def run_demo(out: str = "gptcore-instruct-demo", quick: bool = False, seeds: int = 3,
             threads: Optional[int] = None, overwrite: bool = False, progress: bool = True,
             base: Optional[str] = None, **settings: Any) -> Dict[str, Any]:
    """Run the whole demo into ``out`` (see the module doc) and return its results: "rows" (one
    per model: its name and "runs", :func:`evaluate_model`'s numbers per seed), "seeds" (each
    seed's labeler and reward-model summaries and PPO history), "markdown", "plot", "elapsed",
    "stages" (seconds each, summed over seeds) and "interrupted" (True when Ctrl-C stopped a
    stage: nothing after it ran).

    ``seeds``: runs of everything after pre-training (SFT, the labeler's samples, the reward
    model, PPO, DPO, the evaluation's samples), each with its own seed, into ``out/seed-<i>``;
    the table gives mean +- std over them. ``quick``: :data:`QUICK`'s sizes and a short
    pre-training (a check that everything runs; its numbers mean nothing). ``base``: start from
    this checkpoint instead of the demo's pre-trained model. ``settings``: :class:`DemoConfig`.
    """
    cfg = DemoConfig(**{**(QUICK if quick else {}), **settings})
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds: expected an int >= 1, got {seeds!r}")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"out: {out!r} already holds files (a previous run?); pass "
                              "overwrite=True (--overwrite) to replace them")
    if overwrite and os.path.isdir(out):
        # a previous run with more seeds: its extra seed-<i> directories would sit beside this
        # run's as if they were part of it
        for name in os.listdir(out):
            m = re.fullmatch(r"seed-(\d+)", name)
            if m and int(m.group(1)) >= seeds and os.path.isdir(os.path.join(out, name)):
                shutil.rmtree(os.path.join(out, name))
    if threads:
        from .. import set_num_threads

        set_num_threads(threads)
    say = print if progress else (lambda *a, **k: None)
    stages: Dict[str, float] = {}
    t_start = time.perf_counter()

    def stage(name: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        stages[name] = stages.get(name, 0.0) + dt
        say(f"[instruct-demo] {name}: {dt:.1f} s", flush=True)

    # 1. the pre-trained model, and the prompts (training and evaluation from disjoint files)
    t0 = time.perf_counter()
    if base is None:
        base, _ = pretrained_model(progress, QUICK_PRETRAIN if quick else None)
    pre = load_pretrained(base).eval()
    tok = checkpoint_tokenizer(base, pre.config.vocab_size)
    max_prompt = pre.config.block_size - cfg["max_new"] - 1
    if max_prompt < 16:
        raise ValueError(f"max_new: {cfg['max_new']} leaves {max_prompt} positions of the model's "
                         f"{pre.config.block_size} for the prompt; expected at least 16")
    files = _held_out_files()
    order = np.random.default_rng(cfg["seed"]).permutation(len(files))
    n_sft, n_rank = cfg["n_sft"], cfg["n_rank"]
    n_train = n_sft + n_rank + cfg["n_ppo_prompts"]
    train_items = line_prompts([files[i] for i in order[::2]], n_train, cfg["seed"],
                               cfg["max_new"], max_prompt)
    eval_items = line_prompts([files[i] for i in order[1::2]], cfg["n_eval"], cfg["seed"] + 1,
                              cfg["max_new"], max_prompt)
    os.makedirs(out, exist_ok=True)
    data = {"sft": os.path.join(out, "sft.jsonl"), "ppo": os.path.join(out, "ppo_prompts.jsonl")}
    _write_jsonl(data["sft"], train_items[:n_sft])
    _write_jsonl(data["ppo"], [{"prompt": it["prompt"]} for it in train_items[n_sft + n_rank:]])
    _write_jsonl(os.path.join(out, "eval.jsonl"), eval_items)
    stage("prompts", t0)

    # 2-6 for every seed
    runs = []
    for i in range(seeds):
        run = _one_seed(cfg, cfg["seed"] + i, os.path.join(out, f"seed-{i}"), base, tok,
                        train_items[n_sft:n_sft + n_rank], data, progress, stage, say)
        if run is None:
            return {"interrupted": True, "stages": stages,
                    "elapsed": time.perf_counter() - t_start}
        runs.append(run)

    # 7. every model on the held-out prompts, against its seed's SFT model and reward model
    t0 = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    for name, key in (("pre-trained", None), ("SFT", "sft"), ("PPO", "ppo"), ("DPO", "dpo")):
        bar = f"evaluating {name}" if progress else ""
        evals = [evaluate_model(pre if key is None else r[key], r["sft"], tok, eval_items,
                                cfg["samples"], cfg["max_new"], r["seed"] + 2, reward=r["reward"],
                                progress=bar) for r in runs]
        rows.append({"model": name, "runs": evals})
    stage("evaluation", t0)

    elapsed = time.perf_counter() - t_start
    per_seed = [{k: r[k] for k in ("seed", "labeler", "reward_model", "ppo_history")} for r in runs]
    md = _table(rows, cfg, per_seed, stages, elapsed)
    plot: Optional[str] = os.path.join(out, "ppo_curve.png")
    try:
        plot_ppo([r["ppo_history"] for r in runs], plot, cfg["kl_coef"])
    except ImportError as e:
        say(f"[instruct-demo] no plot (matplotlib is needed): {e}")
        plot = None
    if plot:
        md += f"\nPPO's reward, KL and true rate per step: {os.path.basename(plot)}\n"
    summary = {"config": dict(cfg), "recipes": {"sft": SFT_RECIPE, "reward": REWARD_RECIPE,
                                                 "ppo": PPO_RECIPE, "dpo": DPO_RECIPE},
               "pretrain": base, "rows": rows, "seeds": per_seed, "stages": stages,
               "elapsed_s": elapsed, "plot": plot}
    write_atomic(os.path.join(out, "results.md"), [md.encode("utf-8")])
    write_atomic(os.path.join(out, "results.json"),
                 [json.dumps(summary, indent=1).encode("utf-8")])
    say("\n" + md + f"(written to {os.path.join(out, 'results.md')})")
    return {"interrupted": False, "rows": rows, "seeds": per_seed, "markdown": md, "plot": plot,
            "stages": stages, "elapsed": elapsed}


def _one_seed(cfg: DemoConfig, seed: int, out: str, base: str, tok, rank_items, data, progress,
              stage, say) -> Optional[Dict[str, Any]]:
    """Stages 2-6 with one seed into ``out``: SFT, the labeler's rankings, the reward model, PPO
    and DPO. Returns the models and summaries, or None when Ctrl-C stopped a stage."""
    common = dict(overwrite=True, progress=progress)
    path = lambda name: os.path.join(out, name)  # noqa: E731
    os.makedirs(out, exist_ok=True)

    # 2. SFT on the demonstrations
    t0 = time.perf_counter()
    r = sft(SFTConfig(data=data["sft"], base=base, out=path("sft"), seed=seed, **SFT_RECIPE,
                      **common))
    if r["interrupted"]:
        return None
    sft_model = r["model"].eval()
    stage("SFT", t0)

    # 3. the labeler's rankings of the SFT model's answers
    t0 = time.perf_counter()
    rankings, labels = _label(sft_model, tok, rank_items, cfg, seed + 1, progress)
    n_val = max(1, int(round(cfg["rm_holdout"] * len(rankings))))
    if len(rankings) - n_val < 1:
        raise RuntimeError(f"the labeler kept {len(rankings)} rankings (prompts with at least 2 "
                           "different answers): too few; raise n_rank")
    _write_jsonl(path("rankings.jsonl"), rankings[n_val:])
    _write_jsonl(path("rankings_heldout.jsonl"), rankings[:n_val])
    stage("rankings", t0)
    say(f"[instruct-demo] labeler: {labels['kept']} of {labels['prompts']} prompts kept "
        f"({labels['answer_rate']:.1%} of the SFT model's answers pass)", flush=True)

    # 4. the reward model, from the SFT model
    t0 = time.perf_counter()
    rr = train_reward(RewardConfig(data=path("rankings.jsonl"), val=path("rankings_heldout.jsonl"),
                                   base=path("sft"), out=path("reward"), seed=seed,
                                   **REWARD_RECIPE, **common))
    if rr["interrupted"]:
        return None
    prop_acc, prop_pairs = property_pair_accuracy(rr["model"], rankings[:n_val])
    reward_info = {"val_accuracy": rr["val_accuracy"],
                   "val_pairs": rr["val"][-1]["val_pairs"] if rr["val"] else 0,
                   "property_accuracy": prop_acc, "property_pairs": prop_pairs,
                   "train_rankings": len(rankings) - n_val, "heldout_rankings": n_val}
    stage("reward model", t0)

    def true_rate(prompts, completions) -> float:  # PPO's per-step log of the checked property
        return float(np.mean([passes(p, c) for p, c in zip(prompts, completions)]))

    # 5. PPO against the reward model, answers ending at their newline
    t0 = time.perf_counter()
    pr = ppo(PPOConfig(policy=path("sft"), prompts=data["ppo"], reward_model=path("reward"),
                       out=path("ppo"), steps=cfg["ppo_steps"], batch_size=cfg["ppo_batch"],
                       kl_coef=cfg["kl_coef"], max_new_tokens=cfg["max_new"], stop=[NEWLINE],
                       seed=seed, **PPO_RECIPE, **common), metric_fn=true_rate)
    if pr["interrupted"]:
        return None
    stage("PPO", t0)

    # 6. DPO on the same rankings
    t0 = time.perf_counter()
    dr = dpo(DPOConfig(data=path("rankings.jsonl"), policy=path("sft"), out=path("dpo"),
                       beta=cfg["dpo_beta"], epochs=cfg["dpo_epochs"], seed=seed, **DPO_RECIPE,
                       **common))
    if dr["interrupted"]:
        return None
    stage("DPO", t0)
    return {"seed": seed, "sft": sft_model, "reward": rr["model"], "ppo": pr["model"].eval(),
            "dpo": dr["model"].eval(), "labeler": labels, "reward_model": reward_info,
            "ppo_history": pr["history"]}


# ---- the table and the plot ---------------------------------------------------------------------


def _cell(runs: Sequence[Dict[str, Any]], key: str, scale: float = 1.0, digits: int = 1) -> str:
    """One seed: mean +- standard error over prompts; several: mean +- std over the seeds."""
    vals = [r[key] for r in runs if key in r]
    if not vals:
        return "-"
    if len(vals) == 1:
        m, se = vals[0]
        return f"{m * scale:.{digits}f} +- {se * scale:.{digits}f}"
    means = np.array([v[0] for v in vals]) * scale
    return f"{means.mean():.{digits}f} +- {means.std(ddof=1):.{digits}f}"


def _mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """A per-seed summary number: its mean, +- std when there are several seeds. Seeds where
    it is undefined (NaN, e.g. an accuracy over no pairs) are left out; "n/a" when all are."""
    v = np.asarray(values, np.float64) * scale
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return "n/a"
    return f"{v.mean():.1f}" if len(v) < 2 else f"{v.mean():.1f} +- {v.std(ddof=1):.1f}"


def _table(rows, cfg, per_seed, stages, elapsed) -> str:
    lines = ["| model | line parses (%) | KL from SFT (nats/answer) | reward-model score | "
             "closeness to the file's line (%) | answer length (chars) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        runs = row["runs"]
        length = np.mean([r["length"] for r in runs])
        lines.append(f"| {row['model']} | {_cell(runs, 'rate', 100)} | "
                     f"{_cell(runs, 'kl', 1, 2)} | {_cell(runs, 'reward', 1, 2)} | "
                     f"{_cell(runs, 'closeness', 100)} | {length:.1f} |")
    n = len(per_seed)
    spread = ("+- standard error over prompts" if n == 1 else
              f"mean +- std over {n} seeds of everything after pre-training (SFT, the labeler's "
              "samples, the reward model, PPO, DPO, the evaluation's samples)")
    labels = [s["labeler"] for s in per_seed]
    rms = [s["reward_model"] for s in per_seed]
    return (
        f"Held-out prompts: {cfg['n_eval']} (from files no stage trained on), {cfg['samples']} "
        f"answers each at temperature 1; {spread}. An answer passes when the finished line "
        f"parses (`ast.parse`) and ends within {cfg['max_new']} bytes. KL and reward: each "
        "seed's model against that seed's SFT and reward models; closeness: difflib's ratio "
        "between the answer and the file's real rest of the line.\n\n" + "\n".join(lines) + "\n\n"
        f"Labeler: {cfg['k']} answers for each of {cfg['n_rank']} prompts, "
        f"{_mean_std([x['answer_rate'] for x in labels])}% of the SFT model's answers pass; "
        f"{_mean_std([x['kept'] for x in labels], 1)} prompts ranked. Reward model, held-out "
        f"pair accuracy: {_mean_std([x['val_accuracy'] for x in rms])}% over all pairs "
        f"({rms[0]['heldout_rankings']} rankings), "
        f"{_mean_std([x['property_accuracy'] for x in rms])}% over the pairs whose answers "
        f"differ in the property ({_mean_std([x['property_pairs'] for x in rms], 1)} pairs). "
        f"PPO: {cfg['ppo_steps']} steps of {cfg['ppo_batch']} rollouts, KL coefficient "
        f"{cfg['kl_coef']:g}; DPO: beta {cfg['dpo_beta']:g}, {cfg['dpo_epochs']} epoch(s).\n\n"
        + "Time (s, all seeds): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
        + f"; {elapsed:.0f} s in all ({format_duration(elapsed)}).\n")


SMOOTH = 5  # steps in the plot's running mean


def plot_ppo(histories: Sequence[Sequence[Dict[str, Any]]], path: str, kl_coef: float) -> None:
    """PPO's per-step mean reward-model score, KL to the SFT model and true-property rate (each
    step's batch faint, its running mean over :data:`SMOOTH` steps solid; a colour per seed), as
    a PNG (written whole or not at all). ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reward", "reward-model score"), ("kl", "KL(policy || SFT), nats"),
              ("true_rate", "line parses (rollouts)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(5.5, 6.5), sharex=True)
    try:
        for ax, (key, label) in zip(axes, panels):
            for s, hist in enumerate(histories):
                pts = [(h["step"], h[key]) for h in hist if h.get(key) is not None]
                if not pts:
                    continue
                x, y = (np.asarray(v, np.float64) for v in zip(*pts))
                color = f"C{s}"
                ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)  # each step's batch
                w = min(SMOOTH, len(y))  # and its trailing mean over SMOOTH steps
                mean = np.convolve(y, np.ones(w) / w, mode="valid")
                ax.plot(x[w - 1:], mean, color=color,
                        label=f"seed {s}" if len(histories) > 1 else None)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("PPO step")
        axes[0].set_title(f"PPO against the reward model (KL coefficient {kl_coef:g}); "
                          f"solid: mean of {SMOOTH} steps", fontsize=9)
        if len(histories) > 1:
            axes[0].legend(fontsize=7)
        fig.tight_layout()
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
