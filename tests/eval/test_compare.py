"""Against code no one here wrote (the ``compare`` extra): gptcore's per-request
log-likelihoods equal transformers' on random-init GPT-2 and GPT-1 models, and lm-eval's
``simple_evaluate`` gives the same accuracies (and per-request log-likelihoods) with the
``gptcore`` backend and with the harness's own ``hf`` backend on the same local task."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from gptcore.eval import Scorer

from .test_harness import harness_tasks
from .test_scoring import REQUESTS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["gpt2", "gpt1"])
def hf_checkpoint(request, tmp_path_factory, gpt2_tok):
    """A random-init transformers model (weights drawn wide, so the predictions are far from
    uniform) saved with GPT-2's tokenizer files, and the model object."""
    tr = transformers
    kw = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    if request.param == "gpt1":
        model = tr.OpenAIGPTLMHeadModel(tr.OpenAIGPTConfig(**kw))
    else:
        model = tr.GPT2LMHeadModel(tr.GPT2Config(**kw))
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    model.eval()
    d = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(d / "model")
    # GPT-2's encoder.json / vocab.bpe are transformers' vocab.json / merges.txt; its
    # tokenizer_config.json then names GPT-2's tokenizer class for the GPT-1 model too
    gpt2_tok.save(d / "vocab")
    shutil.copy(d / "vocab" / "encoder.json", d / "model" / "vocab.json")
    shutil.copy(d / "vocab" / "vocab.bpe", d / "model" / "merges.txt")
    tr.GPT2TokenizerFast.from_pretrained(d / "model").save_pretrained(d / "model")
    return d / "model", model


def test_loglikelihoods_equal_transformers(hf_checkpoint, gpt2_tok):
    from gptcore.io.pretrained import load_pretrained

    path, ref = hf_checkpoint
    for share in (True, False):
        sc = Scorer(load_pretrained(path), gpt2_tok, share_context=share, batch_size=3)
        got = sc.loglikelihood(REQUESTS)
        for req, (ll, greedy) in zip(REQUESTS, got):
            ctx, cont = sc.encode_pair(*req)
            seq = torch.tensor([ctx + cont[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(ref(seq).logits[0].double(), dim=-1)
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
            want = float(logp[pos, torch.tensor(cont)].sum())
            assert abs(ll - want) <= 1e-4 * abs(want), (req, ll, want)
            assert greedy == bool((logp[pos].argmax(-1) == torch.tensor(cont)).all())


def test_simple_evaluate_gptcore_equals_hf_backend(hf_checkpoint, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # the harness's hf backend needs it
    pytest.importorskip("gptcore.eval.harness")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _ = hf_checkpoint
    tasks = harness_tasks(tmp_path, mc_name="cmp_tiny_mc", ppl_name="cmp_tiny_ppl")
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # only ours: fast
    runs = {}
    for backend, args in (("gptcore", {"checkpoint": str(path)}),
                          ("hf", {"pretrained": str(path), "tokenizer": str(path),
                                  "dtype": "float32"})):
        runs[backend] = lm_eval.simple_evaluate(
            model=backend, model_args=args, tasks=["cmp_tiny_mc", "cmp_tiny_ppl"], num_fewshot=0,
            device="cpu", batch_size=4, log_samples=True,
            task_manager=manager)
    ours, theirs = runs["gptcore"], runs["hf"]
    for m in ("acc,none", "acc_norm,none"):
        assert ours["results"]["cmp_tiny_mc"][m] == theirs["results"]["cmp_tiny_mc"][m]
    for m in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["cmp_tiny_ppl"][m] == pytest.approx(
            theirs["results"]["cmp_tiny_ppl"][m], rel=1e-4)
    # request by request
    for task in ("cmp_tiny_mc", "cmp_tiny_ppl"):
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) > 0
        for sa, sb in zip(a, b):
            for ra, rb in zip(sa["resps"], sb["resps"]):
                va, vb = np.ravel(ra[0])[0], np.ravel(rb[0])[0]
                assert float(va) == pytest.approx(float(vb), rel=1e-4)
