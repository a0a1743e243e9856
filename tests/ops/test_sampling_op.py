"""ops.sample_tokens (device-side next-token sampling) against reference.sample_tokens.

The CPU op computes in double with the same counter-based uniform numbers as the float64
reference, so it is compared token for token (a mismatch needs a draw within ~1e-16 of a CDF
boundary). The CUDA op computes in float32: its tokens are checked to be consistent with the
reference distribution at the drawn u up to a small tolerance, mostly equal to the CPU's, and
their frequencies are checked by a chi-square test. GPU tests carry the ``gpu`` marker.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gptcore
from gptcore import ops
from gptcore import reference as ref
from tests.helpers import DEVICES, to_cuda


def toks(t) -> np.ndarray:
    return np.asarray(t.numpy() if hasattr(t, "numpy") else t).astype(np.int64)


def logits_for(rng, B, V, Vp, scale=2.0):
    x = rng.randn(B, Vp, scale=scale)
    x[:, V:] = 1e3  # padding columns must never matter
    return x


CONFIGS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.7),
    "hot": dict(temperature=2.5),
    "top_k": dict(top_k=17),
    "top_k_1": dict(top_k=1, temperature=1.3),
    "top_p": dict(top_p=0.8),
    "top_p_small": dict(top_p=0.05),
    "top_k_top_p": dict(top_k=40, top_p=0.6, temperature=0.9),
    "greedy_ignores_filters": dict(temperature=0.0, top_k=3, top_p=0.1),
    "top_k_ge_V": dict(top_k=10 ** 6),
    "top_p_one": dict(top_p=1.0),
}


# ---- CPU op == reference, token for token -------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("B, V, Vp", [(7, 1001, 1024), (3, 97, 97), (1, 5, 8)])
def test_cpu_matches_reference(rng, name, B, V, Vp):
    kw = CONFIGS[name]
    x = logits_for(rng, B, V, Vp)
    seed = int(rng.integers(0, 2 ** 63))
    counter = rng.integers(-5, 10 ** 9, size=B).astype(np.int64)
    got = ops.sample_tokens(x, vocab_size=V, seed=seed, counter=counter.copy(), **kw)
    want, _, _ = ref.sample_tokens(x, vocab_size=V, seed=seed, counter=counter, **kw)
    assert got.dtype == "int32" and tuple(got.shape) == (B,)
    np.testing.assert_array_equal(toks(got), want, err_msg=f"{name} {rng}")


@pytest.mark.parametrize("scale, kw", [
    (6.0, dict(top_p=0.9)),                      # peaked: the nucleus is found among few blocks
    (1.0, dict(top_p=0.95)),                     # flat: the nucleus is most of the vocabulary
    (0.05, dict(top_p=0.5, temperature=1.0)),    # nearly uniform: radix passes over the mantissa
    (2.0, dict(top_k=3000, top_p=0.7)),          # top-k over many blocks, then top-p
    (2.0, dict(top_k=50, temperature=0.6)),
    (3.0, dict(temperature=1.0)),
    (3.0, dict(temperature=1e-6)),               # almost greedy
])
def test_cpu_matches_reference_gpt2_vocab(rng, scale, kw):
    B, V, Vp = 3, 50257, 50304
    x = logits_for(rng, B, V, Vp, scale=scale)
    seed = int(rng.integers(0, 2 ** 64, dtype=np.uint64))
    counter = rng.integers(0, 1000, size=B).astype(np.int64)
    got = ops.sample_tokens(x, vocab_size=V, seed=seed, counter=counter.copy(), **kw)
    want, _, _ = ref.sample_tokens(x, vocab_size=V, seed=seed, counter=counter, **kw)
    np.testing.assert_array_equal(toks(got), want, err_msg=f"{kw} {rng}")


def test_penalties_bias_forced_and_state_in_place(rng):
    """Several decode steps with every control on: counts and counter live in the caller's
    buffers and are updated in place, exactly as the reference's returned copies."""
    B, V, Vp = 9, 203, 256
    counts = rng.integers(0, 3, size=(B, V)).astype(np.int32)
    counter = rng.integers(0, 50, size=B).astype(np.int64)
    bias = rng.randn(V, scale=0.5)
    bias[rng.choice(V, 40, replace=False)] = -np.inf  # banned tokens
    kw = dict(temperature=0.8, top_k=60, top_p=0.9, frequency_penalty=0.4, presence_penalty=-0.3,
              logit_bias=bias, seed=12345)
    r_counts, r_counter = counts.copy(), counter.copy()
    for step in range(6):
        x = logits_for(rng, B, V, Vp)
        forced = np.full(B, -1, np.int32)
        forced[rng.choice(B, 3, replace=False)] = rng.integers(0, V, size=3)
        got = toks(ops.sample_tokens(x, vocab_size=V, counts=counts, counter=counter,
                                     forced=forced, **kw))
        want, r_counts, r_counter = ref.sample_tokens(x, vocab_size=V, counts=r_counts,
                                                      counter=r_counter, forced=forced, **kw)
        np.testing.assert_array_equal(got, want, err_msg=f"step {step} {rng}")
        np.testing.assert_array_equal(counts, r_counts)
        np.testing.assert_array_equal(counter, r_counter)
        assert not np.isin(got[forced < 0], np.flatnonzero(np.isinf(bias))).any()
        np.testing.assert_array_equal(got[forced >= 0], forced[forced >= 0])


def test_forced_rows_change_nothing(rng):
    B, V = 6, 50
    x = logits_for(rng, B, V, V)
    counts = rng.integers(0, 4, size=(B, V)).astype(np.int32)
    counter = np.arange(B, dtype=np.int64) * 7
    forced = np.array([3, -1, 0, -5, 49, -1], np.int32)
    c0, k0 = counts.copy(), counter.copy()
    got = toks(ops.sample_tokens(x, counts=counts, counter=counter, forced=forced,
                                 frequency_penalty=0.5, seed=1))
    f = forced >= 0
    np.testing.assert_array_equal(got[f], forced[f])
    np.testing.assert_array_equal(counts[f], c0[f])
    np.testing.assert_array_equal(counter[f], k0[f])
    np.testing.assert_array_equal(counter[~f], k0[~f] + 1)
    for b in np.flatnonzero(~f):
        want = c0[b].copy()
        want[got[b]] += 1
        np.testing.assert_array_equal(counts[b], want)


def test_counts_and_counter_updates(rng):
    """Each non-forced row adds one to counts[b, token] and to counter[b]; the next draw of a row
    uses the advanced counter."""
    B, V = 4, 30
    x = logits_for(rng, B, V, V, scale=0.1)
    counts = np.zeros((B, V), np.int32)
    counter = np.zeros(B, np.int64)
    seen = []
    for n in range(1, 41):
        t = toks(ops.sample_tokens(x, counts=counts, counter=counter, seed=7))
        seen.append(t)
        np.testing.assert_array_equal(counter, np.full(B, n))
        np.testing.assert_array_equal(counts.sum(axis=1), np.full(B, n))
    seen = np.stack(seen)
    for b in range(B):
        np.testing.assert_array_equal(np.bincount(seen[:, b], minlength=V), counts[b])
    assert all(len(np.unique(seen[:, b])) > 5 for b in range(B))  # the counter moves the draws


def test_no_finite_logit_gives_minus_one(rng):
    B, V = 4, 16
    x = logits_for(rng, B, V, V)
    x[1, :] = np.nan
    x[2, 3] = np.inf  # +inf, NaN and -inf entries never take part
    x[2, 4] = np.nan
    bias = np.zeros(V, np.float32)
    counts = np.zeros((B, V), np.int32)
    counter = np.zeros(B, np.int64)
    for kw in (dict(temperature=0.0), dict(temperature=1.0), dict(top_k=2, top_p=0.5)):
        want, _, _ = ref.sample_tokens(x, logit_bias=bias, counter=counter, **kw)
        got = toks(ops.sample_tokens(x, logit_bias=bias, counts=counts, counter=counter, **kw))
        np.testing.assert_array_equal(got, want)
        assert got[1] == -1 and got[2] not in (3, 4)
    everything_banned = np.full(V, -np.inf, np.float32)
    c0 = counts.copy()
    got = toks(ops.sample_tokens(x, logit_bias=everything_banned, counts=counts, counter=counter))
    np.testing.assert_array_equal(got, -1)
    np.testing.assert_array_equal(counts, c0)  # no token, no count


def test_ties():
    x = np.array([[1, 5, 5, 2, 5, -1]], np.float32)
    assert toks(ops.sample_tokens(x, temperature=0))[0] == 1  # greedy: the lowest index
    bias = np.array([0, 0, 1, 0, 1, 0], np.float32)
    assert toks(ops.sample_tokens(x, temperature=0, logit_bias=bias))[0] == 2
    B = 3000
    # top_k=2 with three tied at the top: all three stay, nothing else
    xb = np.repeat(np.array([[1, 3, 3, 2, 3]], np.float32), B, axis=0)
    got = toks(ops.sample_tokens(xb, top_k=2, seed=3))
    assert set(np.unique(got)) == {1, 2, 4}
    # top_p reached by the first token: its ties stay too
    xb = np.repeat(np.array([[0, 2, 2, 2, 1]], np.float32), B, axis=0)
    got = toks(ops.sample_tokens(xb, top_p=0.1, seed=4))
    assert set(np.unique(got)) == {1, 2, 3}
    want, _, _ = ref.sample_tokens(xb, top_p=0.1, seed=4)
    np.testing.assert_array_equal(got, want)


def test_seed_and_counter_determinism(rng):
    x = logits_for(rng, 64, 500, 512)
    a = toks(ops.sample_tokens(x, vocab_size=500, seed=1))
    np.testing.assert_array_equal(a, toks(ops.sample_tokens(x, vocab_size=500, seed=1)))
    assert (a != toks(ops.sample_tokens(x, vocab_size=500, seed=2))).mean() > 0.5
    c = np.ones(64, np.int64)
    assert (a != toks(ops.sample_tokens(x, vocab_size=500, seed=1, counter=c))).mean() > 0.5


def test_out_buffer(rng):
    B, V = 5, 40
    x = logits_for(rng, B, V, V)
    out = np.full(B, -7, np.int32)
    r = ops.sample_tokens(x, seed=9, out=out)
    want, _, _ = ref.sample_tokens(x, seed=9)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(toks(r), want)
    t = gptcore.empty([B], "int32")
    assert ops.sample_tokens(x, seed=9, out=t) is not None
    np.testing.assert_array_equal(toks(t), want)


# ---- the uniform numbers and the distribution -------------------------------------------------


def test_uniform_numbers_are_uniform():
    u = ref._sample_uniform(123, np.arange(200)[:, None], np.arange(500)[None, :]).ravel()
    assert u.min() >= 0 and u.max() < 1
    counts = np.bincount((u * 50).astype(int), minlength=50)
    assert chi2_stat(counts, np.full(50, u.size / 50)) < chi2_bound(49)
    # stable bits: the same (seed, row, counter) always gives the same number
    assert ref._sample_uniform(5, 3, 9) == ref._sample_uniform(5, np.array([3]), np.array([9]))[0]
    assert ref._sample_uniform(5, 3, 9) != ref._sample_uniform(6, 3, 9)


def chi2_stat(observed, expected):
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    return float(((observed - expected) ** 2 / expected).sum())


def chi2_bound(dof, z=5.0):
    """A generous upper bound: Wilson-Hilferty's chi-square quantile ~z sigmas out."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def frequencies_match(tokens, weights, what):
    p = weights / weights.sum()
    assert np.all(p[np.unique(tokens)] > 0), f"{what}: a token that cannot be drawn was drawn"
    obs = np.bincount(tokens, minlength=p.size)
    keep = p > 0
    stat = chi2_stat(obs[keep], tokens.size * p[keep])
    dof = max(int(keep.sum()) - 1, 1)
    assert stat < chi2_bound(dof), f"{what}: chi-square {stat:.1f} for {dof} dof"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.5, top_k=6),
                                dict(top_p=0.7), dict(top_k=8, top_p=0.9, temperature=1.7)])
def test_frequencies(rng, device, kw):
    V, N = 13, 20000
    x = rng.randn(1, V, scale=1.5)
    w = ref._sample_filter(x[0].astype(np.float64), kw.get("temperature", 1.0), kw.get("top_k"),
                           kw.get("top_p"))
    xs = np.repeat(x, N, axis=0)
    rows = toks(ops.sample_tokens(xs if device == "cpu" else to_cuda(xs),
                                  seed=int(rng.integers(1 << 30)), **kw))
    frequencies_match(rows, w, f"{device} rows {kw} {rng}")


# ---- bad input ---------------------------------------------------------------------------------


def _bad_cases():
    B, V = 3, 10
    x = np.zeros((B, V), np.float32)
    ro = np.zeros((B, V), np.int32)
    ro.flags.writeable = False
    forced = np.zeros(B, np.int32)
    return [
        (dict(logits=np.zeros(V, np.float32)), ValueError, "logits"),
        (dict(logits=np.zeros((0, V), np.float32)), ValueError, "logits"),
        (dict(logits=np.zeros((B, V), np.int32)), TypeError, "logits"),
        (dict(logits=np.zeros((B, 2 * V), np.float32)[:, ::2]), ValueError, "logits"),
        (dict(logits=x, vocab_size=0), ValueError, "vocab_size"),
        (dict(logits=x, vocab_size=V + 1), ValueError, "vocab_size"),
        (dict(logits=x, vocab_size=2.0), TypeError, "vocab_size"),
        (dict(logits=x, temperature=-0.1), ValueError, "temperature"),
        (dict(logits=x, temperature=float("nan")), ValueError, "temperature"),
        (dict(logits=x, temperature=float("inf")), ValueError, "temperature"),
        (dict(logits=x, temperature="hot"), TypeError, "temperature"),
        (dict(logits=x, top_k=0), ValueError, "top_k"),
        (dict(logits=x, top_k=-2), ValueError, "top_k"),
        (dict(logits=x, top_k=2.5), TypeError, "top_k"),
        (dict(logits=x, top_k=True), TypeError, "top_k"),
        (dict(logits=x, top_p=0.0), ValueError, "top_p"),
        (dict(logits=x, top_p=1.5), ValueError, "top_p"),
        (dict(logits=x, top_p=float("nan")), ValueError, "top_p"),
        (dict(logits=x, frequency_penalty=0.5), ValueError, "counts"),
        (dict(logits=x, presence_penalty=-1.0), ValueError, "counts"),
        (dict(logits=x, counts=np.zeros((B, V), np.int32), frequency_penalty=float("inf")),
         ValueError, "frequency_penalty"),
        (dict(logits=x, counts=np.zeros((B, V), np.int32), presence_penalty=float("nan")),
         ValueError, "presence_penalty"),
        (dict(logits=x, counts=np.zeros((B, V), np.int64)), TypeError, "counts"),
        (dict(logits=x, counts=np.zeros((B, V + 1), np.int32)), ValueError, "counts"),
        (dict(logits=x, counts=ro), ValueError, "counts"),
        (dict(logits=x, counter=np.zeros(B, np.int32)), TypeError, "counter"),
        (dict(logits=x, counter=np.zeros(B + 1, np.int64)), ValueError, "counter"),
        (dict(logits=x, logit_bias=np.zeros(V, np.float64)), TypeError, "logit_bias"),
        (dict(logits=x, logit_bias=np.zeros(V - 1, np.float32)), ValueError, "logit_bias"),
        (dict(logits=x, forced=np.array([0, V, -1], np.int32)), ValueError, "forced"),
        (dict(logits=x, forced=np.zeros(B, np.int64)), TypeError, "forced"),
        (dict(logits=x, forced=np.zeros(B + 1, np.int32)), ValueError, "forced"),
        (dict(logits=x, seed=-1), ValueError, "seed"),
        (dict(logits=x, seed=2 ** 64), ValueError, "seed"),
        (dict(logits=x, seed=1.0), TypeError, "seed"),
        (dict(logits=x, out=np.zeros(B, np.int64)), TypeError, "out"),
        (dict(logits=x, out=np.zeros(B + 1, np.int32)), ValueError, "out"),
        (dict(logits=x, forced=forced, out=forced), ValueError, "out"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input(case):
    kw, err, name = _bad_cases()[case]
    logits = kw.pop("logits")
    with pytest.raises(err, match=name):
        ops.sample_tokens(logits, **kw)


def test_cuda_tensors_refused_or_checked():
    if gptcore.cuda.is_available():
        x = gptcore.tensor(np.zeros((2, 8), np.float32), device="cuda")
        with pytest.raises(ValueError, match="counts"):
            ops.sample_tokens(x, counts=np.zeros((2, 8), np.int32))
    else:
        x = np.zeros((2, 8), np.float32)
        assert toks(ops.sample_tokens(x, temperature=0)).tolist() == [0, 0]


# ---- CUDA --------------------------------------------------------------------------------------


def as_seen_on_gpu(x, dtype):
    """The logits as the GPU holds them (bf16-rounded for bfloat16), as float32."""
    return np.asarray(to_cuda(x, dtype).numpy(), np.float32)


def check_consistent(tokens, x, kw, seed, counter, V, tol=1e-4, max_bad=0.01):
    """Each token must be what the reference draws at the row's u, or a neighbour of it within
    `tol` of the total mass (float32 sums); returns the fraction equal to the reference."""
    want, _, _ = ref.sample_tokens(x, vocab_size=V, seed=seed, counter=counter, **kw)
    z = x[:, :V].astype(np.float64)
    if kw.get("logit_bias") is not None:
        z = z + np.asarray(kw["logit_bias"], np.float64)
    if kw.get("counts") is not None:
        c = np.asarray(kw["counts"])
        z = z - (c * kw.get("frequency_penalty", 0.0) + (c > 0) * kw.get("presence_penalty", 0.0))
    u = ref._sample_uniform(seed, np.arange(len(tokens)), counter)
    bad = []
    for b, t in enumerate(tokens):
        if t == want[b]:
            continue
        if kw.get("temperature", 1.0) == 0 or want[b] < 0 or t < 0:
            bad.append(b)
            continue
        w = ref._sample_filter(z[b], kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"))
        cum = np.cumsum(w) / w.sum()
        lo = cum[t - 1] if t > 0 else 0.0
        if not (w[t] > 0 and lo - tol <= u[b] <= cum[t] + tol):
            bad.append(b)
    assert len(bad) <= max_bad * len(tokens), f"rows {bad[:10]} inconsistent ({len(bad)} of {len(tokens)})"
    return float(np.mean(tokens == want))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("B, V, Vp", [(33, 1001, 1024), (5, 50257, 50304), (4, 37, 40)])
def test_cuda_matches_reference(rng, dtype, name, B, V, Vp):
    kw = CONFIGS[name]
    x = as_seen_on_gpu(logits_for(rng, B, V, Vp, scale=3.0), dtype)
    seed = int(rng.integers(0, 2 ** 63))
    counter = rng.integers(0, 10 ** 6, size=B).astype(np.int64)
    ctr = to_cuda(counter)
    got = toks(ops.sample_tokens(to_cuda(x, dtype), vocab_size=V, seed=seed, counter=ctr, **kw))
    np.testing.assert_array_equal(toks(ctr), counter + 1)
    cpu = toks(ops.sample_tokens(x, vocab_size=V, seed=seed, counter=counter.copy(), **kw))
    if kw.get("temperature", 1.0) == 0:
        np.testing.assert_array_equal(got, cpu)  # same float values: the same argmax
    else:
        check_consistent(got, x, kw, seed, counter, V)
        assert np.sum(got != cpu) <= max(2, 0.2 * B), f"{name}: {got} vs the CPU's {cpu}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_penalties_bias_forced_state(rng, dtype):
    B, V, Vp = 17, 3001, 3072
    # values on exact grids (bf16 logits, biases in 1/8, penalties in 1/4): the float32 sums on
    # the GPU are exact, so z equals the reference's
    x = as_seen_on_gpu(logits_for(rng, B, V, Vp, scale=2.0), "bfloat16")
    counts = rng.integers(0, 3, size=(B, V)).astype(np.int32)
    counter = rng.integers(0, 100, size=B).astype(np.int64)
    bias = (rng.integers(-8, 9, size=V) / 8).astype(np.float32)
    bias[rng.choice(V, 300, replace=False)] = -np.inf
    forced = np.full(B, -1, np.int32)
    forced[[0, 5, 11]] = [7, 0, V - 1]
    kw = dict(temperature=0.9, top_k=200, top_p=0.9, frequency_penalty=0.25,
              presence_penalty=0.5, logit_bias=bias)
    seed = 77
    g_counts, g_counter = to_cuda(counts), to_cuda(counter)
    gkw = dict(kw, logit_bias=to_cuda(bias))
    got = toks(ops.sample_tokens(to_cuda(x, dtype), vocab_size=V, counts=g_counts, counter=g_counter,
                                 forced=to_cuda(forced), seed=seed, **gkw))
    f = forced >= 0
    np.testing.assert_array_equal(got[f], forced[f])
    check_consistent(got, x, dict(kw, counts=counts, forced=forced), seed, counter, V)
    assert not np.isin(got[~f], np.flatnonzero(np.isinf(bias))).any()
    want_counts, want_counter = counts.copy(), counter.copy()
    for b in np.flatnonzero(~f):
        want_counts[b, got[b]] += 1
        want_counter[b] += 1
    np.testing.assert_array_equal(toks(g_counts), want_counts)
    np.testing.assert_array_equal(toks(g_counter), want_counter)


@pytest.mark.gpu
def test_cuda_no_finite_logit_and_ties(rng):
    V = 16
    x = logits_for(rng, 3, V, V)
    x[1, :] = np.nan
    bias = np.zeros(V, np.float32)
    bias[:] = -np.inf
    bias[[2, 9]] = 0
    for kw in (dict(temperature=0), dict(top_k=3, top_p=0.5)):
        got = toks(ops.sample_tokens(to_cuda(x), logit_bias=to_cuda(bias), **kw))
        assert got[1] == -1 and got[0] in (2, 9) and got[2] in (2, 9)
    t = np.array([[1, 5, 5, 2, 5, -1]], np.float32)
    assert toks(ops.sample_tokens(to_cuda(t), temperature=0))[0] == 1
    xb = np.repeat(np.array([[1, 3, 3, 2, 3]], np.float32), 3000, axis=0)
    assert set(np.unique(toks(ops.sample_tokens(to_cuda(xb), top_k=2, seed=3)))) == {1, 2, 4}
    xb = np.repeat(np.array([[0, 2, 2, 2, 1]], np.float32), 3000, axis=0)
    assert set(np.unique(toks(ops.sample_tokens(to_cuda(xb), top_p=0.1, seed=4)))) == {1, 2, 3}


@pytest.mark.gpu
def test_cuda_out_buffer_and_checks(rng):
    B, V = 4, 100
    x = to_cuda(logits_for(rng, B, V, V))
    out = gptcore.empty([B], "int32", "cuda")
    r = ops.sample_tokens(x, seed=3, out=out)
    np.testing.assert_array_equal(toks(r), toks(out))
    with pytest.raises(ValueError, match="counter"):
        ops.sample_tokens(x, counter=np.zeros(B, np.int64))  # on the host
    with pytest.raises(ValueError, match="logit_bias"):
        ops.sample_tokens(x, logit_bias=np.zeros(V, np.float32))
    with pytest.raises(TypeError, match="logit_bias"):
        ops.sample_tokens(x, logit_bias=gptcore.zeros([V], "bfloat16", "cuda"))


@pytest.mark.gpu
def test_cuda_graph_replay(rng):
    """Captured once in a CUDA graph, each replay samples the next step: the counter and counts
    advance on the device, and the tokens equal those of the same steps run eagerly."""
    if not hasattr(gptcore.cuda, "Graph"):
        pytest.skip("this gptcore has no gptcore.cuda.Graph")
    B, V, Vp = 3, 1001, 1024
    x = to_cuda(logits_for(rng, B, V, Vp))
    kw = dict(vocab_size=V, temperature=0.9, top_k=50, top_p=0.9, frequency_penalty=0.3, seed=5)
    counts = gptcore.zeros([B, V], "int32", "cuda")
    counter = gptcore.zeros([B], "int64", "cuda")
    out = gptcore.empty([B], "int32", "cuda")
    g = gptcore.cuda.Graph()
    with g.capture():  # recorded, not run
        ops.sample_tokens(x, counts=counts, counter=counter, out=out, **kw)
    e_counts = gptcore.zeros([B, V], "int32", "cuda")
    e_counter = gptcore.zeros([B], "int64", "cuda")
    for step in range(5):
        g.replay()
        want = toks(ops.sample_tokens(x, counts=e_counts, counter=e_counter, **kw))
        np.testing.assert_array_equal(toks(out), want, err_msg=f"step {step}")
    np.testing.assert_array_equal(toks(counter), np.full(B, 5))
    np.testing.assert_array_equal(toks(counts), toks(e_counts))
