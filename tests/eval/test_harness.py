"""The lm-evaluation-harness backend: `simple_evaluate(model="gptcore")` offline on local JSONL
tasks gives the numbers `gptcore eval` gives on the same examples."""

from __future__ import annotations

import json

import pytest

from gptcore.eval import Scorer, evaluate, load_task

from .conftest import FIXTURES

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

PPL_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def harness_tasks(tmp_path, mc_name="gc_tiny_mc", ppl_name="gc_tiny_ppl"):
    """The fixture tasks as harness tasks: their examples without the header (and without the
    demonstration pool) in plain JSONL, and a YAML per task."""
    d = tmp_path / "harness_tasks"
    d.mkdir(exist_ok=True)
    for name, fixture, yaml in ((mc_name, "tiny_mc.jsonl", MC_YAML), (ppl_name, "tiny_ppl.jsonl", PPL_YAML)):
        rows = [json.loads(ln) for ln in (FIXTURES / fixture).read_text().splitlines()[1:]]
        data = d / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("split") != "train"))
        (d / f"{name}.yaml").write_text(yaml.format(name=name, data=data))
    return d


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def test_simple_evaluate_with_gptcore_equals_gptcore_eval(offline, tmp_path, checkpoint, gpt2_tok):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("gptcore.eval.harness")  # registers "gptcore"
    from lm_eval.tasks import TaskManager

    tasks = harness_tasks(tmp_path)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # only ours: fast
    out = lm_eval.simple_evaluate(model="gptcore", model_args={"checkpoint": str(checkpoint)},
                                  tasks=["gc_tiny_mc", "gc_tiny_ppl"], num_fewshot=0,
                                  task_manager=manager)
    theirs = out["results"]
    from gptcore.io.pretrained import load_pretrained

    sc = Scorer(load_pretrained(checkpoint), gpt2_tok)
    # the harness's prompt has no description: score ours without it too
    task = load_task(FIXTURES / "tiny_mc.jsonl")
    task.description = ""
    mc = {r["metric"]: r for r in evaluate(sc, task, shots=[0])}
    for m in ("acc", "acc_norm"):
        assert theirs["gc_tiny_mc"][f"{m},none"] == pytest.approx(mc[m]["value"], abs=1e-12)
        assert theirs["gc_tiny_mc"][f"{m}_stderr,none"] == pytest.approx(mc[m]["stderr"], rel=1e-9)
    ppl = {r["metric"]: r["value"] for r in evaluate(sc, load_task(FIXTURES / "tiny_ppl.jsonl"))}
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert theirs["gc_tiny_ppl"][f"{m},none"] == pytest.approx(ppl[m], rel=1e-6)


def test_backend_answers_the_three_requests(checkpoint, gpt2_tok):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from gptcore.eval.harness import GPTCoreLM

    lm = GPTCoreLM(checkpoint=str(checkpoint), batch_size="4")
    sc = lm.scorer

    def inst(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    ll = lm.loglikelihood([inst("loglikelihood", ("Hello", " world"))])
    assert ll == sc.loglikelihood([("Hello", " world")])
    roll = lm.loglikelihood_rolling([inst("loglikelihood_rolling", ("Some text here.",))])
    assert roll == [sc.loglikelihood_rolling(["Some text here."])[0][0]]
    gen = lm.generate_until([inst("generate_until", ("Once upon a", {"until": ["\n"], "max_gen_toks": 5}))])
    assert gen == sc.generate_until([("Once upon a", ["\n", "<|endoftext|>"], 5)])
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([inst("generate_until", ("Hi", {"do_sample": True, "temperature": 1.0}))])
    with pytest.raises(ValueError, match="checkpoint=DIR"):
        GPTCoreLM()
