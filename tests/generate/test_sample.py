"""gptcore.sample: the KV-cache decoder and the sampling controls.

A tiny random model (initialised so that its next-token distributions are far from flat and
far from one-hot) is the subject throughout. References are written here, independently of the
sampler: full recomputation through ``model(idx)`` / ``model.logits(idx, last_only=True)`` for
the logits, and a NumPy sampler for the distributions that top-k / top-p draw from.
"""

from __future__ import annotations

import argparse
import io
import math
import os

import numpy as np
import pytest

import gptcore
from gptcore.cli import sample
from gptcore.models import GPTConfig
from gptcore.models import GPT
from gptcore.generate import PAD, complete, filtered_distribution, generate
from gptcore.models.kvcache import Decoder
from tests.helpers import mixing_weights, rel_err


def _model(seed=0, device="cpu", dtype="float32", **over):
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=48, vocab_size=97)
    base.update(over)
    m = GPT(GPTConfig(**base), device=device, dtype=dtype, seed=seed)
    m.load_state_dict(mixing_weights(m, seed + 1))
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


def _full_last_logits(model, ids):
    return np.asarray(model.logits(np.asarray(ids)[None, :], last_only=True)[0], np.float64)


class CharTokenizer:
    """Token i <-> a string of 1-3 letters: decoded text has tokens of several characters, so
    stop sequences can begin in the middle of a token."""

    ALPHA = "abcdefghijklmnopqrstuvwxyz"

    def __init__(self, vocab_size, eot=None):
        self.pieces = [self.ALPHA[i % 26] * (1 + i % 3) for i in range(vocab_size)]
        self.eot_token = eot
        self.by_char = {}
        for i, p in enumerate(self.pieces):
            if len(p) == 1 and i != eot:
                self.by_char.setdefault(p, i)

    def decode(self, ids):
        return "".join(self.pieces[int(i)] for i in ids)

    def encode(self, text):
        return [self.by_char[c] for c in text]


# ---- cached decoding is exact -------------------------------------------------------------------


@pytest.mark.parametrize("over", [
    {},                                                     # GPT-2 block
    {"prenorm": False},                                     # GPT-1: post-LN, no ln_f
    {"attn_window": [None, 3], "block_size": 40},           # GPT-3: dense and banded layers
    {"bias": False, "n_head": 2, "n_embd": 18},              # no biases, odd head size 9
])
def test_cached_logits_equal_full_recomputation(rng, over):
    m = _model(seed=int(rng.integers(1 << 30)), **over)
    B, P, T = 3, 6, 20
    ids = rng.integers(0, m.config.vocab_size, size=(B, T))
    dec = Decoder(m, B, T)
    got = dec.forward(ids[:, :P])
    for t in range(P, T + 1):
        want = m(ids[:, :t])[:, -1]
        assert got.shape == want.shape == (B, m.config.vocab_size)
        err = rel_err(got, want)
        assert err < 1e-5, f"position {t}: relative error {err:.2e} ({rng})"
        if t < T:
            got = dec.forward(ids[:, t:t + 1])
    assert dec.pos == T


def test_decoder_checks_its_bounds(model):
    dec = Decoder(model, 2, 5)
    with pytest.raises(ValueError, match="tokens"):
        dec.forward(np.zeros((2, 6), np.int64))
    with pytest.raises(ValueError, match="tokens"):
        dec.forward(np.zeros((3, 1), np.int64))
    with pytest.raises(ValueError, match="tokens"):
        dec.forward(np.full((2, 1), 97))
    with pytest.raises(ValueError, match="max_len"):
        Decoder(model, 1, model.config.block_size + 1)
    assert dec.pos == 0  # nothing ran
    with pytest.raises(ValueError, match="one position"):
        dec.forward_tensor(gptcore.tensor(np.zeros((2, 3), np.int32)))
    assert dec.forward_tensor(gptcore.tensor(np.zeros((2, 3), np.int32)), head=False) is None
    assert dec.pos == 3


# ---- greedy, seeds, batches ----------------------------------------------------------------------


def test_greedy_equals_argmax_of_full_recomputation(model, rng):
    prompt = list(rng.integers(0, 97, size=5))
    got = generate(model, [prompt], 12, temperature=0)
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(np.argmax(_full_last_logits(model, ids))))
    np.testing.assert_array_equal(got, np.array([ids]))
    assert got.dtype == np.int64


def test_seeded_runs_repeat(model, rng):
    idx = rng.integers(0, 97, size=(3, 4))
    kw = dict(temperature=1.3, top_k=40, top_p=0.95, seed=1234)
    a = generate(model, idx, 15, **kw)
    b = generate(model, idx, 15, **kw)
    np.testing.assert_array_equal(a, b)
    c = generate(model, idx, 15, **dict(kw, seed=4321))
    assert not np.array_equal(a, c)


def test_prompts_of_different_lengths_equal_running_each_alone(model, rng):
    prompts = [list(rng.integers(0, 97, size=n)) for n in (3, 9, 1, 6)]
    batch, lengths = generate(model, prompts, 10, temperature=0, return_lengths=True)
    assert batch.shape == (4, 19)
    for b, p in enumerate(prompts):
        alone = generate(model, [p], 10, temperature=0)[0]
        assert lengths[b] == len(p) + 10
        np.testing.assert_array_equal(batch[b, :lengths[b]], alone)
        assert (batch[b, lengths[b]:] == PAD).all()
    # with sampling, row 0's random stream is the same as when it runs alone
    s_batch = generate(model, prompts, 10, temperature=1.0, seed=7)
    s_alone = generate(model, [prompts[0]], 10, temperature=1.0, seed=7)
    np.testing.assert_array_equal(s_batch[0, :13], s_alone[0])


def test_one_dimensional_prompt_and_tensor_input(model, rng):
    p = rng.integers(0, 97, size=7)
    a = generate(model, p, 5, temperature=0)
    assert a.shape == (12,)
    b = generate(model, gptcore.tensor(p[None, :].astype(np.int32)), 5, temperature=0)
    np.testing.assert_array_equal(b[0], a)
    out, n = generate(model, p, 0, return_lengths=True)
    np.testing.assert_array_equal(out, p)
    assert n == 7


def test_stream_yields_the_same_tokens(model, rng):
    idx = rng.integers(0, 97, size=(2, 3))
    full = generate(model, idx, 8, temperature=0.9, seed=3)
    steps = list(generate(model, idx, 8, temperature=0.9, seed=3, stream=True))
    assert len(steps) == 8 and all(len(s) == 2 for s in steps)
    for b in range(2):
        np.testing.assert_array_equal(np.concatenate([s[b] for s in steps]), full[b, 3:])
    single = list(generate(model, idx[0], 8, temperature=0.9, seed=3, stream=True))
    assert [t for s in single for t in s] == list(full[0, 3:])


# ---- top-k / top-p against a NumPy reference sampler ----------------------------------------------


def _reference_distribution(logits, temperature, top_k=None, top_p=None):
    """What top-k then top-p sampling at this temperature draws from (written independently)."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(p.size, bool)
    if top_k is not None:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    if top_p is not None:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        mass, chosen = 0.0, np.zeros(p.size, bool)
        for i in np.argsort(-q):
            chosen[i] = True
            mass += q[i]
            if mass >= top_p:
                break
        keep &= chosen
    out = np.where(keep, p, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, None),
    (0.7, 6, None),
    (1.0, None, 0.6),
    (1.5, 12, 0.8),
])
def test_sampling_matches_reference_distribution(model, rng, temperature, top_k, top_p):
    prompt = list(rng.integers(0, 97, size=4))
    n = 4000
    draws = generate(model, [prompt] * n, 1, temperature=temperature, top_k=top_k, top_p=top_p,
                     seed=int(rng.integers(1 << 31)))[:, -1]
    p = _reference_distribution(_full_last_logits(model, prompt), temperature, top_k, top_p)
    support = p > 0
    assert support[draws].all(), f"sampled a token outside the top-k/top-p set ({rng})"
    if top_k is not None:
        assert support.sum() <= top_k
    # chi-square over the support, pooling rare tokens (expected count < 5) into one cell
    counts = np.bincount(draws, minlength=p.size).astype(np.float64)
    exp = n * p
    big = support & (exp >= 5)
    obs_cells = list(counts[big]) + ([counts[support & ~big].sum()] if (support & ~big).any() else [])
    exp_cells = list(exp[big]) + ([exp[support & ~big].sum()] if (support & ~big).any() else [])
    obs_cells, exp_cells = np.array(obs_cells), np.array(exp_cells)
    chi2 = float(((obs_cells - exp_cells) ** 2 / exp_cells).sum())
    df = max(len(exp_cells) - 1, 1)
    bound = df + 8 * math.sqrt(2 * df) + 10  # far in the tail: a false alarm is ~impossible
    assert chi2 < bound, f"chi-square {chi2:.1f} over {df} dof exceeds {bound:.1f} ({rng})"


def test_filtered_distribution_matches_reference(rng):
    logits = rng.standard_normal(500) * 3
    for t, k, p in [(1.0, None, None), (0.5, 10, None), (2.0, None, 0.3), (1.0, 50, 0.9)]:
        got = filtered_distribution(logits, t, k, p)
        np.testing.assert_allclose(got, _reference_distribution(logits, t, k, p), rtol=1e-10, atol=1e-15)
    greedy = filtered_distribution(logits, 0.0)
    assert greedy[np.argmax(logits)] == 1.0 and greedy.sum() == 1.0


def test_top_k_one_is_greedy(model, rng):
    idx = rng.integers(0, 97, size=(2, 5))
    np.testing.assert_array_equal(generate(model, idx, 6, top_k=1, seed=5),
                                  generate(model, idx, 6, temperature=0))


# ---- penalties and logit bias ----------------------------------------------------------------------


def _reference_greedy(model, prompt, n, freq=0.0, pres=0.0, bias=None):
    ids, counts = list(prompt), np.zeros(model.config.vocab_size)
    for _ in range(n):
        z = _full_last_logits(model, ids)
        if bias:
            for t, v in bias.items():
                z[t] += v
        z -= counts * freq + (counts > 0) * pres
        t = int(np.argmax(z))
        counts[t] += 1
        ids.append(t)
    return ids


@pytest.mark.parametrize("freq, pres", [(0.7, 0.0), (0.0, 1.5), (0.4, 0.9), (-0.5, 0.0)])
def test_penalties_follow_openai_definition(model, rng, freq, pres):
    prompt = list(rng.integers(0, 97, size=4))
    got = generate(model, [prompt], 14, temperature=0, frequency_penalty=freq, presence_penalty=pres)
    np.testing.assert_array_equal(got[0], _reference_greedy(model, prompt, 14, freq, pres))


def test_penalties_count_generated_tokens_only(model):
    x = 11
    prompt = [x] * 6
    # +30 makes x the favourite; the prompt's six x's do not count, so x comes first, and after
    # that a presence penalty of 40 keeps it out.
    out = generate(model, [prompt], 8, temperature=0, logit_bias={x: 30.0}, presence_penalty=40.0)[0, 6:]
    assert out[0] == x and x not in out[1:]


def test_logit_bias(model, rng):
    idx = rng.integers(0, 97, size=(2, 3))
    forced = generate(model, idx, 6, temperature=1.0, seed=0, logit_bias={42: 100.0})
    assert (forced[:, 3:] == 42).all()
    greedy = generate(model, idx, 6, temperature=0)
    banned = set(int(t) for t in greedy[:, 3:].ravel())
    out = generate(model, idx, 6, temperature=0, logit_bias={t: -math.inf for t in banned})
    assert not banned & set(int(t) for t in out[:, 3:].ravel())
    # JSON-style string keys work too
    np.testing.assert_array_equal(generate(model, idx, 3, temperature=0, logit_bias={"42": 100}),
                                  forced[:, :6])


# ---- logprobs -----------------------------------------------------------------------------------------


def test_logprobs(model, rng):
    prompt = list(rng.integers(0, 97, size=5))
    out, lp = generate(model, [prompt], 4, temperature=0.8, seed=2, logprobs=3)
    assert lp.token_logprobs.shape == (1, 4) and lp.top_tokens.shape == (1, 4, 3)
    ids = list(prompt)
    for n in range(4):
        z = _full_last_logits(model, ids)
        ref = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        tok = int(out[0, 5 + n])
        assert abs(lp.token_logprobs[0, n] - ref[tok]) < 1e-4
        np.testing.assert_array_equal(lp.top_tokens[0, n], np.argsort(-ref)[:3])
        np.testing.assert_allclose(lp.top_logprobs[0, n], np.sort(ref)[::-1][:3], atol=1e-4)
        ids.append(tok)
    entries = [e for step in generate(model, prompt, 4, temperature=0.8, seed=2, logprobs=3, stream=True)
               for e in step]
    assert [e.token for e in entries] == list(out[0, 5:])
    assert all(len(e.top) == 3 for e in entries)


def test_logprobs_do_not_change_the_tokens(model, rng):
    prompts = [list(rng.integers(0, 97, size=n)) for n in (3, 6, 4)]
    kw = dict(temperature=0.9, top_p=0.9, frequency_penalty=0.4, presence_penalty=0.3,
              logit_bias={5: 2.0, 7: -float("inf")}, seed=int(rng.integers(1 << 31)))
    plain = generate(model, prompts, 8, **kw)
    with_lp, lp = generate(model, prompts, 8, logprobs=2, **kw)
    np.testing.assert_array_equal(plain, with_lp)
    assert not (plain[:, 6:] == 7).any()  # banned (among the generated tokens)
    assert np.isfinite(lp.token_logprobs).all()


def test_tokens_follow_the_reference_sampler(model, rng):
    """generate() is prefill + decode steps + ops.sample_tokens: replaying the steps with full
    recomputation and gptcore.reference.sample_tokens gives the same tokens."""
    from gptcore import reference as R
    prompt = list(rng.integers(0, 97, size=5))
    seed = int(rng.integers(1 << 31))
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.2)
    out = generate(model, [prompt], 10, seed=seed, **kw)[0]
    ids, V = list(prompt), model.config.vocab_size
    counts, counter = np.zeros((1, V), np.int32), np.zeros(1, np.int64)
    for _ in range(10):
        z = _full_last_logits(model, ids)[None, :]
        tok, counts, counter = R.sample_tokens(z, seed=seed, counts=counts, counter=counter, **kw)
        ids.append(int(tok[0]))
    np.testing.assert_array_equal(out, ids)


# ---- stopping -------------------------------------------------------------------------------------------


def test_token_stop_sequences_end_rows(model, rng):
    idx = rng.integers(0, 97, size=(2, 4))
    free = generate(model, idx, 10, temperature=0)
    stop_seq = [int(free[0, 7]), int(free[0, 8])]  # row 0's 4th and 5th new tokens
    out, lengths = generate(model, idx, 10, temperature=0, stop=[stop_seq], return_lengths=True)
    # row 0 ends before the first occurrence of the stop sequence, which is not returned
    new0 = list(free[0, 4:])
    first = next(i for i in range(len(new0) - 1) if new0[i:i + 2] == stop_seq)
    assert lengths[0] == 4 + first
    np.testing.assert_array_equal(out[0, :lengths[0]], free[0, :4 + first])
    assert (out[0, lengths[0]:] == PAD).all()
    # row 1 goes on unless it met the sequence too
    new1 = list(free[1, 4:])
    hit1 = [i for i in range(len(new1) - 1) if new1[i:i + 2] == stop_seq]
    assert lengths[1] == 4 + (hit1[0] if hit1 else 10)


def test_text_stop_sequences(model, rng):
    tok = CharTokenizer(97)
    prompt = "abcab"
    free = complete(model, tok, prompt, max_new_tokens=12, temperature=0)
    assert len(free) >= 12
    stop = free[5:7]  # two characters from the middle of the completion
    cut = free.index(stop)
    got = complete(model, tok, prompt, max_new_tokens=12, temperature=0, stop=stop)
    assert got == free[:cut]
    # streaming holds back text that might start the stop sequence: same result
    assert "".join(complete(model, tok, prompt, max_new_tokens=12, temperature=0, stop=[stop],
                            stream=True)) == free[:cut]
    # tokens: only those that end before the stop sequence begins
    ids = tok.encode(prompt)
    out, n = generate(model, ids, 12, temperature=0, stop=stop, tokenizer=tok, return_lengths=True)
    kept = tok.decode(out[len(ids):n])
    assert free[:cut].startswith(kept) and len(free[:cut]) - len(kept) < 3


def test_text_stop_in_batch_and_stream(model):
    tok = CharTokenizer(97)
    prompts = ["abc", "zyxwv"]
    free = complete(model, tok, prompts, max_new_tokens=10, temperature=0)
    stop = free[0][3:5]
    got = complete(model, tok, prompts, max_new_tokens=10, temperature=0, stop=[stop])
    assert got == [f[:f.index(stop)] if stop in f else f for f in free]
    pieces = ["", ""]
    for i, piece in complete(model, tok, prompts, max_new_tokens=10, temperature=0, stop=[stop],
                             stream=True):
        pieces[i] += piece
    assert pieces == got


def test_token_stop_sequences_with_text_stream(model):
    tok = CharTokenizer(97)
    ids = generate(model, tok.encode("qrs"), 12, temperature=0)[3:]
    stop = [int(ids[4]), int(ids[5])]
    want = complete(model, tok, "qrs", max_new_tokens=12, temperature=0, stop=[stop])
    first = next(i for i in range(11) if list(ids[i:i + 2]) == stop)
    assert want == tok.decode(ids[:first])
    assert "".join(complete(model, tok, "qrs", max_new_tokens=12, temperature=0, stop=[stop],
                            stream=True)) == want


def test_end_of_text_stops_a_row(model, rng):
    idx = rng.integers(0, 97, size=(1, 4))
    free = generate(model, idx, 8, temperature=0)[0]
    eot = int(free[6])  # the third new token plays end-of-text
    out, n = generate(model, idx, 8, temperature=0, tokenizer=CharTokenizer(97, eot=eot),
                      return_lengths=True)
    n = int(n[0])
    first = list(free[4:]).index(eot)
    assert n == 4 + first and eot not in list(out[0, 4:n])
    np.testing.assert_array_equal(out[0, :n], free[:4 + first])


def test_complete_matches_generate(model):
    tok = CharTokenizer(97)
    text = complete(model, tok, "hello", max_new_tokens=7, temperature=0.9, seed=11)
    ids = generate(model, tok.encode("hello"), 7, temperature=0.9, seed=11)
    assert text == tok.decode(ids[5:])
    text2, lp = complete(model, tok, "hello", max_new_tokens=7, temperature=0.9, seed=11, logprobs=2)
    assert text2 == text and lp.token_logprobs.shape == (7,) and lp.top_tokens.shape == (7, 2)
    texts, lps = complete(model, tok, ["hello", "ab"], max_new_tokens=7, temperature=0.9, seed=11,
                          logprobs=2)
    assert texts[0] == text and lps.token_logprobs.shape == (2, 7)
    assert "".join(complete(model, tok, "hello", max_new_tokens=7, temperature=0.9, seed=11,
                            stream=True)) == text


# ---- bad controls -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, exc, match", [
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=-0.2), ValueError, "top_p"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(max_new_tokens=45), ValueError, "max_new_tokens"),  # 4 + 45 > block_size 48
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.5), ValueError, "max_new_tokens"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(frequency_penalty=float("inf")), ValueError, "frequency_penalty"),
    (dict(presence_penalty="1"), ValueError, "presence_penalty"),
    (dict(logit_bias={500: 1.0}), ValueError, "logit_bias"),
    (dict(logit_bias={3: float("nan")}), ValueError, "logit_bias"),
    (dict(logit_bias=[(3, 1.0)]), TypeError, "logit_bias"),
    (dict(logit_bias={t: -math.inf for t in range(97)}), ValueError, "logit_bias"),
    (dict(stop="\n"), ValueError, "stop"),  # text stops need a tokenizer
    (dict(stop=[[]]), TypeError, "stop"),
    (dict(seed=-3), ValueError, "seed"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(logprobs=-1), ValueError, "logprobs"),
    (dict(stream="yes"), TypeError, "stream"),
])
def test_bad_controls(model, kw, exc, match):
    args = dict(max_new_tokens=4)
    args.update(kw)
    n = args.pop("max_new_tokens")
    with pytest.raises(exc, match=match):
        generate(model, np.zeros((2, 4), np.int64), n, **args)


@pytest.mark.parametrize("idx, exc, match", [
    (np.zeros((2, 3), np.float32), TypeError, "idx"),
    (np.full((1, 3), 97), ValueError, "idx"),
    (np.full((1, 3), -1), ValueError, "idx"),
    ([[1, 2], []], ValueError, "idx"),
    (np.zeros((1, 2, 3), np.int64), ValueError, "idx"),
    ("hello", TypeError, "idx"),
])
def test_bad_prompts(model, idx, exc, match):
    with pytest.raises(exc, match=match):
        generate(model, idx, 2)


def test_bad_model_and_tokenizer(model):
    with pytest.raises(TypeError, match="model"):
        generate(object(), [[1]], 2)
    with pytest.raises(TypeError, match="tokenizer"):
        complete(model, None, "abc")
    with pytest.raises(TypeError, match="prompt"):
        complete(model, CharTokenizer(97), 123)


# ---- the command line ----------------------------------------------------------------------------------------


def test_sample_command_streams_text(tmp_path, model):
    from gptcore import train

    ckpt = os.path.join(tmp_path, "run", "checkpoint")
    byte_model = _model(vocab_size=257)
    train.save_checkpoint(ckpt, byte_model, None, {"step": 0, "data_meta": {"tokenizer": "byte"}})
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    sample.add_subcommand(sub)
    args = parser.parse_args(["sample", "--checkpoint", os.path.join(tmp_path, "run"), "--prompt",
                              "def ", "--max-new-tokens", "12", "--temperature", "0"])
    buf = io.StringIO()
    assert sample.run(args, out=buf) == 0
    text = buf.getvalue()
    from gptcore.data import ByteTokenizer

    expect = complete(byte_model, ByteTokenizer(), "def ", max_new_tokens=12, temperature=0)
    assert text == "def " + expect + "\n"
    with pytest.raises(FileNotFoundError):
        sample.run(parser.parse_args(["sample", "--checkpoint", os.path.join(tmp_path, "nope")]))
    # without --max-new-tokens the default (200) is cut to what the context holds after the
    # prompt (this model has fewer positions than 200), as the README's plain command expects
    assert byte_model.config.block_size < 200
    buf = io.StringIO()
    sample.run(parser.parse_args(["sample", "--checkpoint", os.path.join(tmp_path, "run"),
                                  "--prompt", "def ", "--temperature", "0"]), out=buf)
    full = complete(byte_model, ByteTokenizer(), "def ", temperature=0,
                    max_new_tokens=byte_model.config.block_size - 4)
    assert buf.getvalue() == "def " + full + "\n"
    # an explicit length that does not fit is refused before anything is printed
    buf = io.StringIO()
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample.run(parser.parse_args(["sample", "--checkpoint", os.path.join(tmp_path, "run"),
                                      "--prompt", "def ", "--max-new-tokens", "1000"]), out=buf)
    assert buf.getvalue() == ""


# ---- CUDA ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_cached_logits_cuda(rng, dtype, tol):
    cpu = _model(seed=3, attn_window=[None, 5])
    gpu = _model(seed=3, device="cuda", dtype=dtype, attn_window=[None, 5])
    B, P, T = 2, 5, 30
    ids = rng.integers(0, 97, size=(B, T))
    dec = Decoder(gpu, B, T)
    got = dec.forward(ids[:, :P])
    for t in range(P, T + 1):
        err = rel_err(got, cpu(ids[:, :t])[:, -1])
        assert err < tol, f"{dtype} position {t}: relative error {err:.2e} ({rng})"
        if t < T:
            got = dec.forward(ids[:, t:t + 1])


@pytest.mark.gpu
def test_generate_cuda_float32_equals_cpu(rng):
    cpu, gpu = _model(seed=4), _model(seed=4, device="cuda")
    prompts = [list(rng.integers(0, 97, size=n)) for n in (2, 7)]
    np.testing.assert_array_equal(generate(gpu, prompts, 12, temperature=0),
                                  generate(cpu, prompts, 12, temperature=0))
    out = generate(gpu, prompts, 12, temperature=0.8, top_p=0.9, seed=1, logprobs=2)
    assert out[0].shape == (2, 19)


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(rng, monkeypatch):
    """Decode steps replayed from one CUDA graph give the tokens of eager steps (same device,
    same sampler state), for a batch with prompts of different lengths and every control."""
    gpu = _model(seed=5, device="cuda")
    prompts = [list(rng.integers(0, 97, size=n)) for n in (3, 9, 5)]
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, frequency_penalty=0.3, presence_penalty=0.1,
              logit_bias={3: 1.5}, seed=7, stop=[[11, 12]])
    graphed = generate(gpu, prompts, 20, return_lengths=True, **kw)
    monkeypatch.setenv("GPTCORE_CUDA_GRAPHS", "0")
    eager = generate(gpu, prompts, 20, return_lengths=True, **kw)
    np.testing.assert_array_equal(graphed[0], eager[0])
    np.testing.assert_array_equal(graphed[1], eager[1])


def test_complete_treats_typed_special_token_text_as_tiktoken_does():
    """A typed "<|endoftext|>" is refused by default (tiktoken's encode), becomes the control token
    with allowed_special, and never silently turns into it."""
    from gptcore import Tokenizer
    from gptcore.models import GPT, GPTConfig

    tok = Tokenizer.gpt2()
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257), seed=1)
    prompt = "a <|endoftext|> b"
    with pytest.raises(ValueError, match=r"prompt\[1\]: .*special token '<\|endoftext\|>'"):
        complete(m, tok, ["fine", prompt], max_new_tokens=2)
    ids = tok.encode(prompt, allowed_special="all")
    assert 50256 in ids
    want = generate(m, ids, 3, temperature=0)[len(ids):]
    assert complete(m, tok, prompt, max_new_tokens=3, temperature=0,
                    allowed_special="all") == tok.decode(want)
