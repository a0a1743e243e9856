"""Decoder's row API (continuous batching): prefill_row and step_rows with every row at its own
position, against the full-sequence forward (``model.logits(seq, last_only=True)``), which runs
no cache at all.

Scenarios: rows starting at different times and prompt lengths, a row that leaves and is re-used
for a shorter prompt (its stale cache content past the new prompt must not be attended), an idle
row fed garbage, odd sizes, GPT-2 (pre-LN), GPT-1 (post-LN) and GPT-3-style banded layers.
"""

from __future__ import annotations

import numpy as np
import pytest

from gptcore.models import GPT, GPTConfig
from gptcore.models.kvcache import Decoder
from tests.helpers import rel_err

TOL = 1e-4  # fp32, relative L2 per row

CONFIGS = {
    "gpt2": dict(),
    "gpt1": dict(prenorm=False),
    "gpt3-banded": dict(n_layer=3, attn_window=[None, 3, 1]),
}


def make_model(rng, **kw):
    base = dict(n_layer=2, n_head=3, n_embd=15, block_size=24, vocab_size=131)
    base.update(kw)
    model = GPT(GPTConfig(**base), seed=int(rng.integers(1 << 30)))
    # non-trivial weights: larger than the 0.02 init so errors are not hidden by tiny logits
    state = {}
    for name, p in model.parameters().items():
        shape = tuple(p.shape)
        if name == "wte":
            shape = (model.config.vocab_size, shape[1])
        arr = rng.randn(*shape, scale=0.3)
        if "ln" in name and name.endswith("weight"):
            arr = arr + 1.0
        state[name] = arr
    model.load_state_dict(state)
    return model.eval()


def full_logits(model, seq):
    return model.logits(np.asarray(seq)[None, :], last_only=True)[0]


class Rows:
    """The caller's bookkeeping: each row's token sequence so far (None: idle)."""

    def __init__(self, dec, rng):
        self.dec, self.rng = dec, rng
        self.seqs = [None] * dec.batch_size
        self.V = dec.config.vocab_size

    def join(self, b, n):
        prompt = self.rng.integers(0, self.V, n)
        self.seqs[b] = list(prompt)
        return self.dec.prefill_row(b, prompt)

    def step(self):
        """One step_rows: active rows get a random next token; idle rows get garbage at a random
        position. Returns the logits and the active rows."""
        S, L = self.dec.batch_size, self.dec.max_len
        ids = self.rng.integers(0, self.V, S)
        pos = self.rng.integers(0, L, S)
        active = [b for b in range(S) if self.seqs[b] is not None]
        for b in active:
            pos[b] = len(self.seqs[b])
            self.seqs[b].append(int(ids[b]))
        return self.dec.step_rows(ids, pos), active


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_rows_at_their_own_positions_match_the_full_forward(rng, kind):
    model = make_model(rng, **CONFIGS[kind])
    S, L = 3, 20
    dec = Decoder(model, S, L)
    rows = Rows(dec, rng)
    checked = 0

    def check_prefill(b, n):
        nonlocal checked
        got = rows.join(b, n)
        assert got.shape == (model.config.vocab_size,) and got.dtype == np.float32
        assert rel_err(got, full_logits(model, rows.seqs[b])) < TOL, (kind, b, rng)
        checked += 1

    check_prefill(0, 5)
    check_prefill(1, 1)      # a one-token prompt; row 2 idle (garbage) for now
    for t in range(14):
        if t == 3:
            check_prefill(2, 7)   # a row joins later, longer prompt
        if t == 6:
            check_prefill(0, 2)   # row 0 leaves; re-used for a shorter prompt (stale cache behind)
        if t == 9:
            rows.seqs[1] = None   # row 1 leaves and idles (garbage positions from now on)
        logits, active = rows.step()
        assert logits.shape == (S, model.config.vocab_size) and logits.dtype == np.float32
        for b in active:
            assert rel_err(logits[b], full_logits(model, rows.seqs[b])) < TOL, (kind, t, b, rng)
            checked += 1
    assert checked > 30
    # row 2 reached a sequence longer than the banded layers' windows and near the cache's end
    assert len(rows.seqs[2]) == 7 + 11


def test_prefill_row_leaves_other_rows_and_the_shared_position_alone(rng):
    model = make_model(rng)
    dec = Decoder(model, 2, 10)
    rows = Rows(dec, rng)
    rows.join(0, 4)
    k_before = [np.array(k.numpy()[0]) for k in dec.cache.k]
    rows.join(1, 9)
    for k, kb in zip(dec.cache.k, k_before):
        np.testing.assert_array_equal(k.numpy()[0], kb)
    assert dec.pos == 0


def test_row_api_rejects_bad_input_clearly(rng):
    model = make_model(rng)
    V = model.config.vocab_size
    dec = Decoder(model, 3, 8)
    for b, err in ((3, ValueError), (-1, ValueError), (True, TypeError), (1.0, TypeError)):
        with pytest.raises(err, match="b: "):
            dec.prefill_row(b, [1, 2])
    with pytest.raises(ValueError, match="tokens: expected a 1-D"):
        dec.prefill_row(0, [[1, 2]])
    with pytest.raises(ValueError, match="tokens: expected a 1-D"):
        dec.prefill_row(0, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="tokens: sequence length 9 exceeds"):
        dec.prefill_row(0, np.ones(9, np.int64))
    with pytest.raises(ValueError, match=f"tokens: token id {V} is outside"):
        dec.prefill_row(0, [1, V])
    with pytest.raises(TypeError, match="tokens: expected integer"):
        dec.prefill_row(0, [1.5, 2.0])
    good_ids, good_pos = np.zeros(3, np.int64), np.array([0, 3, 7])
    with pytest.raises(ValueError, match=r"ids: expected shape \(3,\)"):
        dec.step_rows(np.zeros(4, np.int64), good_pos)
    with pytest.raises(ValueError, match=r"positions: expected shape \(2,\)"):
        dec.step_rows(np.zeros(2, np.int64), good_pos)  # k = 2 leading rows need 2 positions
    with pytest.raises(ValueError, match=r"positions: expected shape \(3,\)"):
        dec.step_rows(good_ids, good_pos[None, :])
    with pytest.raises(ValueError, match=r"positions: position 8 is outside \[0, 8\)"):
        dec.step_rows(good_ids, [0, 8, 1])
    with pytest.raises(ValueError, match="positions: position -1 is outside"):
        dec.step_rows(good_ids, [0, -1, 1])
    with pytest.raises(TypeError, match="positions: expected integers"):
        dec.step_rows(good_ids, [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=f"ids: token id {V} is outside"):
        dec.step_rows([0, V, 1], good_pos)
    with pytest.raises(ValueError, match="ids: token id -1 is outside"):
        dec.step_rows([0, -1, 1], good_pos)
    # nothing above touched the cache: a valid call still matches the full forward
    rows = Rows(dec, rng)
    rows.join(1, 3)
    logits, _ = rows.step()
    assert rel_err(logits[1], full_logits(model, rows.seqs[1])) < TOL


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_one_batched_step_equals_batch1_decoders_per_row(rng, kind):
    """step_rows on 8 rows, all at different positions (one batched pass), equals each row
    decoded alone by its own batch-1 Decoder (the per-row form)."""
    model = make_model(rng, **CONFIGS[kind])
    S, L = 8, 22
    dec = Decoder(model, S, L)
    V = model.config.vocab_size
    lengths = rng.permutation(np.arange(1, 12))[:S]  # eight different prompt lengths
    singles = []
    pos = np.zeros(S, np.int64)
    for b in range(S):
        prompt = rng.integers(0, V, lengths[b])
        alone = Decoder(model, 1, L)
        want = alone.forward(prompt[None, :])[0]
        assert rel_err(dec.prefill_row(b, prompt), want) < 1e-5
        singles.append(alone)
        pos[b] = lengths[b]
    for step in range(6):
        ids = rng.integers(0, V, S)
        got = dec.step_rows(ids, pos)
        for b in range(S):
            want = singles[b].forward([[ids[b]]])[0]
            assert rel_err(got[b], want) < 1e-5, (kind, step, b, pos.tolist(), rng)
        pos += 1


def test_stepping_only_the_leading_rows_leaves_the_others_alone(rng):
    """step_rows with k < batch_size ids steps rows 0..k-1 (what a server with k busy rows
    pays for) exactly as the full step does, and neither reads nor writes rows k.."""
    model = make_model(rng)
    S, L, k = 6, 16, 2
    dec, ref = Decoder(model, S, L), Decoder(model, S, L)
    V = model.config.vocab_size
    pos = np.zeros(S, np.int64)
    for b in range(S):
        prompt = rng.integers(0, V, 3 + b)
        dec.prefill_row(b, prompt)
        ref.prefill_row(b, prompt)
        pos[b] = 3 + b
    rest = [np.array(c.numpy()[k:]) for c in dec.cache.k + dec.cache.v]
    for step in range(4):
        ids = rng.integers(0, V, S)
        got = dec.step_rows(ids[:k], pos[:k])
        want = ref.step_rows(ids, pos)
        assert got.shape == (k, V)
        for b in range(k):
            assert rel_err(got[b], want[b]) < 1e-5, (step, b, rng)
        pos += 1
    for c, before in zip(dec.cache.k + dec.cache.v, rest):
        np.testing.assert_array_equal(c.numpy()[k:], before)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_prefill_rows_in_one_pass_equals_prefill_row_each(rng, kind):
    """Several rows (not contiguous, prompts of different lengths, one of a single token)
    prefilled together give each row prefill_row's logits, and the rows then decode exactly as
    if each had been prefilled alone; rows not named keep their cache."""
    model = make_model(rng, **CONFIGS[kind])
    S, L = 6, 20
    together, alone = Decoder(model, S, L), Decoder(model, S, L)
    V = model.config.vocab_size
    keep = rng.integers(0, V, 5)
    together.prefill_row(2, keep)
    alone.prefill_row(2, keep)
    rows, lengths = [4, 0, 5, 1], [7, 1, 12, 3]
    prompts = [rng.integers(0, V, n) for n in lengths]
    got = together.prefill_rows(rows, prompts)
    assert got.shape == (len(rows), V) and got.dtype == np.float32
    for j, (b, p) in enumerate(zip(rows, prompts)):
        assert rel_err(got[j], alone.prefill_row(b, p)) < 1e-5, (kind, b, rng)
    pos = np.zeros(S, np.int64)
    for b, n in zip(rows + [2], lengths + [5]):
        pos[b] = n
    for step in range(5):
        ids = rng.integers(0, V, S)
        a, b_ = together.step_rows(ids, pos), alone.step_rows(ids, pos)
        for b in rows + [2]:
            assert rel_err(a[b], b_[b]) < 1e-5, (kind, step, b, rng)
        pos[rows + [2]] += 1


def test_prefill_rows_rejects_bad_input(rng):
    model = make_model(rng)
    dec = Decoder(model, 3, 8)
    V = model.config.vocab_size
    with pytest.raises(ValueError, match="rows: each row at most once"):
        dec.prefill_rows([1, 1], [[1], [2]])
    with pytest.raises(ValueError, match="prompts: expected 2 prompts"):
        dec.prefill_rows([0, 1], [[1]])
    with pytest.raises(ValueError, match="b: row 3 is outside"):
        dec.prefill_rows([0, 3], [[1], [2]])
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a 1-D"):
        dec.prefill_rows([0, 1], [[1], []])
    with pytest.raises(ValueError, match=rf"prompts\[0\]: token id {V} is outside"):
        dec.prefill_rows([0, 1], [[V], [2]])
    with pytest.raises(ValueError, match=r"prompts\[1\]: sequence length 9 exceeds"):
        dec.prefill_rows([0, 1], [[1], np.ones(9, np.int64)])
    assert dec.prefill_rows([], []).shape == (0, V)
