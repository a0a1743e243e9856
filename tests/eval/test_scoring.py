"""Scorer: log-likelihoods against a plain full-sequence computation from the model's logits
(the shared-context path and the batched path both), the harness's tokenisation rules,
rolling windows, greedy generation, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from gptcore.eval import Scorer, rolling_windows

from .conftest import tiny_model


def reference_ll(model, ctx, cont):
    """sum log p(cont | ctx) and greedy-ness from one full forward, log-softmax in float64."""
    seq = list(ctx) + list(cont)
    logits = model(np.array([seq[:-1]]))[0].astype(np.float64)
    m = logits.max(axis=1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    pos = np.arange(len(ctx) - 1, len(seq) - 1)
    return float(logp[pos, cont].sum()), bool((logits[pos].argmax(axis=1) == cont).all())


REQUESTS = [
    ("The quick brown fox", " jumps"),
    ("The quick brown fox", " sleeps over the lazy dog"),
    ("The quick brown fox", " runs"),
    ("The quick brown fox ", "eats"),  # trailing space: moves into the continuation
    ("", "Hello world"),  # empty context: conditioned on <|endoftext|>
    ("Once upon a time", " there"),
]


@pytest.mark.parametrize("prenorm", [True, False], ids=["gpt2", "gpt1"])
def test_loglikelihood_equals_plain_scoring(gpt2_tok, prenorm):
    model = tiny_model(prenorm=prenorm, seed=3)
    shared = Scorer(model, gpt2_tok, batch_size=2).loglikelihood(REQUESTS)
    plain = Scorer(model, gpt2_tok, share_context=False).loglikelihood(REQUESTS)
    sc = Scorer(model, gpt2_tok)
    for req, a, b in zip(REQUESTS, shared, plain):
        want, greedy = reference_ll(model, *sc.encode_pair(*req))
        assert a[0] == pytest.approx(want, rel=1e-5, abs=1e-5), req
        assert b[0] == pytest.approx(want, rel=1e-5, abs=1e-5), req
        assert a[1] == b[1] == greedy, req


@pytest.mark.parametrize("batch_size", [2, 7, 64])
def test_shared_contexts_batch_together(model, gpt2_tok, rng, batch_size):
    """Several questions' contexts in one prefill pass (of one length and not), cache rows
    copied per choice, choices of different lengths, a question with more choices than a
    batch."""
    sc = Scorer(model, gpt2_tok, batch_size=batch_size)
    pairs = []
    for q, n_choices in enumerate((3, 4, 9, 2, 3)):
        ctx = [int(t) for t in rng.integers(0, 50257, (12, 12, 12, 7, 20)[q])]
        pairs += [(ctx, [int(t) for t in rng.integers(0, 50257, 1 + (q + c) % 5)])
                  for c in range(n_choices)]
    pairs.append(([5, 6, 7], [8, 9]))  # a lone request: the plain path
    rng.shuffle(pairs)
    got = sc.loglikelihood_tokens(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        want, want_greedy = reference_ll(model, ctx, cont)
        assert ll == pytest.approx(want, rel=1e-5, abs=1e-5), rng
        assert greedy == want_greedy


def test_greedy_flag_is_true_for_the_argmax_continuation(model, gpt2_tok):
    sc = Scorer(model, gpt2_tok)
    ctx = sc.encode("The weather today")
    nxt = []
    for _ in range(3):  # the model's own greedy continuation, token by token
        nxt.append(int(model(np.array([ctx + nxt]))[0, -1].argmax()))
    other = [(nxt[0] + 1) % 50000] + nxt[1:]
    (ll_g, g), (ll_o, o) = sc.loglikelihood_tokens([(ctx, nxt), (ctx, other)])
    assert g and not o
    assert ll_g > ll_o


def test_encode_pair_follows_the_harness(model, gpt2_tok):
    sc = Scorer(model, gpt2_tok)
    enc = sc.encode
    # trailing whitespace joins the continuation; the pair is encoded whole and split
    ctx, cont = sc.encode_pair("Hello ", "world")
    assert ctx == enc("Hello") and cont == enc("Hello world")[len(enc("Hello")):]
    assert cont == enc(" world")
    # an empty context is end-of-text
    assert sc.encode_pair("", "Hi there") == ([50256], enc("Hi there"))
    # the whole encoding decides where the continuation starts
    c2, x2 = sc.encode_pair("don", "'t")
    assert c2 + x2 == enc("don't")


def test_left_truncation_keeps_the_last_tokens_and_is_counted(gpt2_tok):
    model = tiny_model(block_size=16, seed=2)
    sc = Scorer(model, gpt2_tok)
    ctx = list(range(100, 140))  # 40 tokens, the model holds 16
    cont = [7, 8, 9]
    (ll, _), = sc.loglikelihood_tokens([(ctx, cont)])
    assert sc.truncated == 1
    want, _ = reference_ll(model, ctx[-(17 - len(cont)):], cont)  # last block_size + 1 tokens
    assert ll == pytest.approx(want, rel=1e-5)
    # a shared context truncated the same way for every choice still agrees
    both = sc.loglikelihood_tokens([(ctx, cont), (ctx, [11, 12, 13])])
    assert both[0][0] == pytest.approx(ll, rel=1e-5)
    assert sc.truncated == 3


def test_bad_requests_are_refused(model, gpt2_tok):
    sc = Scorer(model, gpt2_tok)
    with pytest.raises(ValueError, match="continuation: empty"):
        sc.loglikelihood([("Some context", "")])
    with pytest.raises(ValueError, match="more than the 64 positions"):
        sc.loglikelihood_tokens([([1], list(range(65)))])
    with pytest.raises(TypeError, match="requests\\[0\\]"):
        sc.loglikelihood(["just a string"])
    with pytest.raises(ValueError, match="block_size"):
        Scorer(model, gpt2_tok, max_length=65)
    with pytest.raises(ValueError, match="max_tokens"):
        sc.generate_until([("Hi", ["\n"], 64)])


def test_rolling_windows_cover_every_token_once():
    toks = list(range(1000, 1037))
    for L in (1, 5, 8, 37, 64):
        wins = rolling_windows(toks, 50256, L)
        predicted = [t for _, cont in wins for t in cont]
        assert predicted == toks
        for ctx, cont in wins:
            full = ctx + cont
            assert 1 <= len(full) - 1 <= L  # the inputs fit the model
            # each window's inputs are the tokens right before what it predicts
            start = toks.index(cont[0])
            assert ctx[-1] == (toks[start - 1] if start else 50256)
        assert wins[0][0] == [50256]


def test_rolling_windows_match_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    toks = list(range(500, 561))
    for L in (4, 16, 61, 100):
        theirs = [utils.make_disjoint_window(w)
                  for w in utils.get_rolling_token_windows(toks, 50256, L, 1)]
        assert rolling_windows(toks, 50256, L) == [(list(a), list(b)) for a, b in theirs]


def test_loglikelihood_rolling_sums_the_windows(gpt2_tok):
    model = tiny_model(block_size=16, seed=4)
    sc = Scorer(model, gpt2_tok)
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    (ll, n), = sc.loglikelihood_rolling([text])
    toks = sc.encode(text)
    assert n == len(toks) > 16
    want = sum(reference_ll(model, c, x)[0] for c, x in rolling_windows(toks, 50256, 16))
    assert ll == pytest.approx(want, rel=1e-5)
    # a text that fits: every token conditioned on all before it, the first on end-of-text
    short = "Hello there."
    (ll1, _), = sc.loglikelihood_rolling([short])
    assert ll1 == pytest.approx(reference_ll(model, [50256], sc.encode(short))[0], rel=1e-5)


def test_generate_until_is_greedy_and_stops(model, gpt2_tok):
    from gptcore.generate import complete

    sc = Scorer(model, gpt2_tok, batch_size=2)
    prompts = ["Q: What is the capital of France?\nA:", "Once upon a time"]
    outs = sc.generate_until([(p, [], 6) for p in prompts])
    for p, o in zip(prompts, outs):
        assert o == complete(model, gpt2_tok, p, max_new_tokens=6, temperature=0.0)
    # a stop string cuts the text where it begins
    stop = outs[1][2:4]
    assert stop and sc.generate_until([(prompts[1], [stop], 6)])[0] == outs[1][: outs[1].find(stop)]
