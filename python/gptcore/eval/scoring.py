"""Scoring primitives: the log-likelihood of a continuation, rolling log-likelihood of a text,
greedy generation until a stop string -- lm-evaluation-harness's three requests, batched.

Tokenisation follows the harness (``lm_eval/api/model.py`` and ``models/huggingface.py``), so
numbers agree with its ``hf`` backend on the same model:

* trailing whitespace of a context moves to the front of its continuation;
* context + continuation is encoded whole, and the continuation's tokens are what follows the
  context's own encoding (``whole[len(encode(context)):]``);
* an empty context is conditioned on ``<|endoftext|>``;
* an input longer than the model keeps its last ``block_size + 1`` tokens (left truncation;
  :attr:`Scorer.truncated` counts those requests).

Speed. Requests whose (tokenised) contexts are equal -- the choices of a multiple-choice
question -- share one run of the context: a batch of questions' contexts fill a KV cache
together (one row each), each continuation gets a copy of its context's row, and the
continuations of contexts of one length run together from there (:meth:`Scorer._score_shared`). Everything else is sorted by
length and batched, longest first, so padding stays small. The LM head runs only on the
positions that are scored.

    >>> sc = Scorer(model, tokenizer)
    >>> sc.loglikelihood([("The cat sat on the", " mat"), ("The cat sat on the", " moon")])
    [(-3.1, True), (-9.7, False)]
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import ops
from ..models.kvcache import Decoder
from ..tensor import from_numpy, upload

__all__ = ["Scorer", "rolling_windows"]

Pair = Tuple[List[int], List[int]]


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> List[Pair]:
    """Disjoint windows that score every token of ``tokens`` once, each with as much preceding
    context as fits in ``max_len`` positions (the harness's rolling windows with context 1):
    ``[(context, continuation), ...]``. The first window is conditioned on ``prefix``
    (``<|endoftext|>``)."""
    toks = [int(t) for t in tokens]
    out: List[Pair] = []
    done = 0
    while done < len(toks):
        n = min(max_len, len(toks) - done)  # tokens this window predicts
        end = done + n
        inp = ([prefix] + toks)[max(0, end - max_len): end]  # the max_len inputs before `end`
        out.append((inp[: len(inp) - (n - 1)], toks[done:end]))
        done = end
    return out


class Scorer:
    """Batched log-likelihoods and greedy generation with a gptcore model and its tokenizer.

    ``batch_size``: sequences per forward in the plain path. ``max_length``: the positions one
    forward may use (default the model's ``block_size``). ``share_context``: run a context shared
    by several requests once (turn off to score every request as a full sequence; the two agree
    to float32 rounding). ``progress``: a callback ``progress(n_done)`` called as requests
    finish (the CLI's progress bar).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: Optional[int] = None,
                 share_context: bool = True):
        if not hasattr(model, "hidden_states") or not hasattr(model, "config"):
            raise TypeError(f"model: expected a gptcore.GPT, got {type(model).__name__}")
        if tokenizer is None or not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "decode"):
            raise TypeError("tokenizer: expected a tokenizer with encode() and decode()")
        for name, v in (("batch_size", batch_size), ("max_length", max_length)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        block = model.config.block_size
        if max_length is not None and max_length > block:
            raise ValueError(f"max_length: {max_length} exceeds the model's block_size {block}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or block)
        self.share_context = bool(share_context)
        eot = getattr(tokenizer, "eot_token", None)
        if eot is None:
            raise ValueError("tokenizer: has no end-of-text token (an empty context is "
                             "conditioned on it)")
        self.eot = int(eot)
        self.truncated = 0  # requests whose input was left-truncated to fit the model
        self.progress = None

    # ---- tokenisation ------------------------------------------------------------------

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (special-token text such as ``<|endoftext|>`` is the special
        token, as transformers' GPT-2 tokenizer does)."""
        try:
            return [int(t) for t in self.tokenizer.encode(text, allowed_special="all")]
        except TypeError:  # a tokenizer without special-token controls (bytes)
            return [int(t) for t in self.tokenizer.encode(text)]

    def encode_pair(self, context: str, continuation: str) -> Pair:
        """(context ids, continuation ids) by the harness's rules (see the module doc)."""
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise TypeError(f"context, continuation: expected str, got "
                            f"{type(context).__name__}, {type(continuation).__name__}")
        if continuation == "":
            raise ValueError(f"continuation: empty (nothing to score) after context {context[-40:]!r}")
        if context == "":
            cont = self.encode(continuation)
            if cont[0] == self.eot:  # it already starts with the token we would condition on
                return cont[:1], cont[1:]
            return [self.eot], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        n_ctx = len(self.encode(context)) if context else 0
        ctx, cont = whole[:n_ctx], whole[n_ctx:]
        if not ctx:  # the context was all whitespace
            ctx = [self.eot]
        if not cont:
            raise ValueError(f"continuation: {continuation!r} encodes to no tokens of its own "
                             f"after context {context[-40:]!r}")
        return ctx, cont

    # ---- the three requests ----------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Tuple[str, str]]) -> List[Tuple[float, bool]]:
        """For each (context, continuation): (sum of the continuation's token log-probs given
        the context, whether greedy decoding from the context produces exactly it)."""
        pairs = [self.encode_pair(*_pair(r, i)) for i, r in enumerate(requests)]
        return self.loglikelihood_tokens(pairs)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> List[Tuple[float, int]]:
        """For each text: (its total log-likelihood, its number of tokens), scored over
        disjoint windows of the model's context (each window sees as much of the text before
        it as fits; the first is conditioned on end-of-text)."""
        windows, owner, counts = [], [], []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}]: expected a str, got {type(text).__name__}")
            toks = self.encode(text)
            counts.append(len(toks))
            for w in rolling_windows(toks, self.eot, self.max_length):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        progress, self.progress = self.progress, None  # counted in texts, not windows
        try:
            scores = self.loglikelihood_tokens(windows)
        finally:
            self.progress = progress
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        self._advance(len(texts))
        return list(zip(totals, counts))

    def generate_until(self, requests: Sequence[Tuple[str, Sequence[str], int]]) -> List[str]:
        """Greedy completions of each (context, stop strings, max new tokens) with the existing
        sampler (:func:`gptcore.generate.generate`); each is cut where the first stop string
        begins. A context that does not leave room for ``max_tokens`` keeps its last tokens."""
        from ..generate import PAD, generate

        out: List[Optional[str]] = [None] * len(requests)
        by_kind: Dict[int, List[int]] = defaultdict(list)  # max_tokens -> requests
        prompts, stops = [], []
        for i, req in enumerate(requests):
            if not isinstance(req, (tuple, list)) or len(req) != 3:
                raise TypeError(f"requests[{i}]: expected (context, until, max_tokens), got {req!r}")
            context, until, max_tokens = req
            if isinstance(until, str):
                until = [until]
            until = [u for u in until if u]
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) \
                    or not 1 <= max_tokens < self.max_length:
                raise ValueError(f"requests[{i}]: max_tokens {max_tokens!r} must be in "
                                 f"[1, {self.max_length})")
            ids = self.encode(context) or [self.eot]
            room = self.max_length - int(max_tokens)
            if len(ids) > room:
                ids = ids[-room:]
                self.truncated += 1
            prompts.append(ids)
            stops.append(until)
            by_kind[int(max_tokens)].append(i)
        for budget, rows in by_kind.items():
            for s in range(0, len(rows), self.batch_size):
                chunk = rows[s: s + self.batch_size]
                # no stop= here: the sampler ends a row at a whole token, and the harness keeps
                # the text of a token in which a stop string begins, up to that string
                toks = generate(self.model, [prompts[i] for i in chunk], budget, temperature=0.0,
                                tokenizer=self.tokenizer)
                for r, i in enumerate(chunk):
                    new = [int(t) for t in toks[r, len(prompts[i]):] if t != PAD]
                    text = self.tokenizer.decode(new)
                    cut = min([text.find(u) for u in stops[i] if u in text] or [len(text)])
                    out[i] = text[:cut]
                self._advance(len(chunk))
        return out  # type: ignore[return-value]

    # ---- token-level scoring ----------------------------------------------------------------

    def loglikelihood_tokens(self, pairs: Sequence[Pair]) -> List[Tuple[float, bool]]:
        """(sum log-prob, greedy) of each (context ids, continuation ids) pair; the context must
        be non-empty (use end-of-text), the continuation at most ``max_length`` tokens."""
        L = self.max_length
        prepared: List[Pair] = []
        for i, (ctx, cont) in enumerate(pairs):
            ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
            if not ctx or not cont:
                raise ValueError(f"pairs[{i}]: the context and the continuation must both have "
                                 f"tokens (got {len(ctx)} and {len(cont)})")
            if len(cont) > L:
                raise ValueError(f"pairs[{i}]: the continuation has {len(cont)} tokens, more than "
                                 f"the {L} positions of the model")
            if len(ctx) + len(cont) > L + 1:  # keep the last L + 1 tokens, as the harness does
                ctx = ctx[len(ctx) + len(cont) - (L + 1):]
                self.truncated += 1
            prepared.append((ctx, cont))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(prepared)
        groups: Dict[tuple, List[int]] = defaultdict(list)
        for i, (ctx, _) in enumerate(prepared):
            groups[tuple(ctx)].append(i)
        singles: List[int] = []
        # shared contexts: whole questions, longest context first, batch_size questions a chunk
        # (their prefill holds fewer tokens than batch_size whole requests would)
        shared: List[Tuple[List[int], List[int]]] = []
        for ctx, members in groups.items():
            if self.share_context and len(members) > 1 and len(ctx) > 1:
                shared.append((list(ctx), members))
            else:
                singles.extend(members)
        shared.sort(key=lambda g: -len(g[0]))
        chunk: List[Tuple[List[int], List[int]]] = []
        for g in shared + [None]:  # type: ignore[list-item]
            if chunk and (g is None or len(chunk) == self.batch_size):
                scores = self._score_shared([(c, [prepared[j][1] for j in m]) for c, m in chunk])
                for i, r in zip([j for _, m in chunk for j in m], scores):
                    results[i] = r
                chunk = []
            if g is not None:
                chunk.append(g)
        # the rest: longest first, batches of similar lengths
        singles.sort(key=lambda i: -(len(prepared[i][0]) + len(prepared[i][1])))
        for s in range(0, len(singles), self.batch_size):
            part = singles[s: s + self.batch_size]
            for i, r in zip(part, self._score_full([prepared[j] for j in part])):
                results[i] = r
            self._advance(len(part))
        return results  # type: ignore[return-value]

    def _advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)

    def _score_full(self, batch: Sequence[Pair]) -> List[Tuple[float, bool]]:
        """Score whole sequences: one forward of the (right-padded) inputs ctx + cont[:-1]."""
        T = max(len(c) + len(x) - 1 for c, x in batch)
        idx = np.zeros((len(batch), T), np.int32)  # padding after each row never reaches it
        rows, cols, targets = [], [], []
        for b, (ctx, cont) in enumerate(batch):
            seq = ctx + cont[:-1]
            idx[b, : len(seq)] = seq
            start = len(ctx) - 1  # the position whose output predicts cont[0]
            rows += [b] * len(cont)
            cols += range(start, start + len(cont))
            targets += cont
        dec = Decoder(self.model, len(batch), T)
        hs = _hidden(dec, idx, 0)[rows, cols]  # (N, C): only the scored positions
        return self._head_scores(hs, targets, [len(c) for _, c in batch])

    def _score_shared(self, groups: Sequence[Tuple[List[int], Sequence[List[int]]]]
                      ) -> List[Tuple[float, bool]]:
        """Score the continuations of several contexts, running each context once.

        The contexts without their last token fill a KV cache, one row each, in one pass
        (right-padded: a row's padding comes after its own positions, so causal attention keeps
        it out of them, and its cache entries there are overwritten below before anything reads
        them). Then each continuation gets a copy of its context's cache row, and the
        continuations of contexts of one length P run together from position P, as many a pass
        as keep it within the tokens of ``batch_size`` whole requests:
        [ctx[-1]] + cont[:-1], right-padded likewise. Returns the scores in the order of the
        groups' continuations."""
        model = self.model
        G = len(groups)
        L = max(len(ctx) - 1 + len(c) for ctx, conts in groups for c in conts)
        P_max = max(len(ctx) for ctx, _ in groups) - 1
        idx = np.zeros((G, P_max), np.int32)
        for g, (ctx, _) in enumerate(groups):
            idx[g, : len(ctx) - 1] = ctx[:-1]
        prefix = Decoder(model, G, L)  # one max_len for every cache: a row has one layout
        prefix.forward_tensor(model._to_device_ids(idx), head=False)
        rows = [(g, len(ctx) - 1, ctx[-1], cont)
                for g, (ctx, conts) in enumerate(groups) for cont in conts]
        scores: Dict[int, Tuple[float, bool]] = {}
        by_len: Dict[int, List[int]] = defaultdict(list)  # P -> rows continuing from there
        for r, (_, P, _, _) in enumerate(rows):
            by_len[P].append(r)
        for P, members in by_len.items():
            # as many continuations a pass as keep it within the tokens of batch_size whole
            # requests (a continuation's pass is short: many fit)
            Tn_max = max(len(rows[r][3]) for r in members)
            per_pass = max(1, self.batch_size * (P + Tn_max) // Tn_max)
            for s in range(0, len(members), per_pass):
                part = members[s: s + per_pass]
                n = len(part)
                many = Decoder(model, n, L)
                for src_list, dst_list in ((prefix.cache.k, many.cache.k),
                                           (prefix.cache.v, many.cache.v)):
                    for src, dst in zip(src_list, dst_list):
                        row = src.numel() // G  # one context's H * L * head_dim values
                        flat_src, flat_dst = src.view([G, row]), dst.view([n, row])
                        for b, r in enumerate(part):
                            flat_dst.narrow(b, 1).copy_(flat_src.narrow(rows[r][0], 1))
                conts = [rows[r][3] for r in part]
                tails = [[rows[r][2]] + rows[r][3][:-1] for r in part]
                Tn = max(len(t) for t in tails)
                tail_idx = np.zeros((n, Tn), np.int32)
                for b, t in enumerate(tails):
                    tail_idx[b, : len(t)] = t
                hs = _hidden(many, tail_idx, P)[[b for b, c in enumerate(conts) for _ in c],
                                                [j for c in conts for j in range(len(c))]]
                got = self._head_scores(hs, [t for c in conts for t in c], [len(c) for c in conts])
                scores.update(zip(part, got))
                self._advance(n)
        return [scores[r] for r in range(len(rows))]

    def _head_scores(self, hs: np.ndarray, targets: Sequence[int],
                     lengths: Sequence[int]) -> List[Tuple[float, bool]]:
        """The tied LM head on the scored hidden states only: (N, C) -> log p(target) and
        whether the target is the argmax, summed / and-ed per request of ``lengths`` tokens."""
        model = self.model
        V = model.config.vocab_size
        h_t = upload(np.ascontiguousarray(hs, dtype=np.float32), model.device, model.dtype)
        logits, _ = ops.linear_forward(h_t, model.parameters()["wte"], None)
        tgt = np.asarray(targets, np.int32)
        # the greedy token of each position: the sampler's argmax (ties: the lowest id, as
        # NumPy's and PyTorch's argmax), on the logits' device
        best = ops.sample_tokens(logits, vocab_size=V, temperature=0.0)
        greedy = np.asarray(best.numpy()) == tgt
        tgt_t = from_numpy(tgt, "targets")
        if model.device != "cpu":
            tgt_t = tgt_t.to(device=model.device)
        # -log p(target): the fused softmax cross-entropy over the real vocabulary
        nll = ops.cross_entropy_forward(logits, tgt_t, V, -1)
        logp = -np.asarray(nll.numpy(), dtype=np.float64)
        out, s = [], 0
        for n in lengths:
            out.append((float(logp[s: s + n].sum()), bool(greedy[s: s + n].all())))
            s += n
        return out


def _hidden(dec: Decoder, idx: np.ndarray, pos: int) -> np.ndarray:
    """The final hidden states (B, T, C) of ``idx`` fed to ``dec``'s cache from position
    ``pos`` (a host view, valid until the decoder runs again). The trunk's own cached forward
    (the same block code as training and decoding) with its final LayerNorm: the Decoder's
    forward runs the LM head on one position only, scoring needs every position. A Decoder's
    buffers are shared by all layers, unlike a full-sequence forward's, which keeps every
    layer's activations for a backward that scoring never runs."""
    model = dec.model
    h = model._trunk_forward(model._to_device_ids(idx), dec._buffers(idx.shape[1]),
                             cache=dec.cache, pos=pos, final_ln=True)
    dec.pos = pos + idx.shape[1]
    return np.asarray(h.numpy())


def _pair(req, i: int) -> Tuple[str, str]:
    if not isinstance(req, (tuple, list)) or len(req) != 2:
        raise TypeError(f"requests[{i}]: expected a (context, continuation) pair, got {req!r}")
    return req[0], req[1]
