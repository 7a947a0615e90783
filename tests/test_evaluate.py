"""`loramoe eval` end to end on a tiny model with a saved LoRAMoE adapter and the built-in suites."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import loramoe
from loramoe import LoraMoEConfig
from loramoe.cli import main as cli_main
from loramoe.errors import OutputFolderError, UsageError
from loramoe.evaluate.main import _read_base_eval, evaluate
from loramoe.suites.base import Benchmark, Example
from loramoe.suites.registry import KNOWLEDGE, LM_LOSS, suite_names
from tests.conftest import save_tiny, tiny_llama


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_tiny(root / "model")
    model = loramoe.attach(tiny_llama(), LoraMoEConfig())
    torch.manual_seed(0)
    for _, layer in loramoe.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    loramoe.save_adapter(model, root / "adapter")
    return root


def test_eval_writes_every_number_and_item_against_the_base(tiny_run, tmp_path):
    results = evaluate(model=str(tiny_run / "model"), adapter=tiny_run / "adapter", suite=",".join(suite_names()),
                       vs_base=True, output=tmp_path, limit=3, max_new_tokens=4, batch_size=4)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(results))
    names = set(saved["benchmarks"])
    assert {"knowledge/capital", "task/summarization", "text/wikipedia"} <= names
    capital = saved["benchmarks"]["knowledge/capital"]
    assert capital["metric"] == "qa" and len(capital["items"]) == capital["test_items"] <= 3
    assert {"prediction", "base_prediction", "answers", "contains", "em", "f1"} <= set(capital["items"][0])
    assert set(capital["change"]) >= {"base_accuracy", "tuned_accuracy", "lost", "gained"}
    text = saved["benchmarks"]["text/wikipedia"]
    assert text["forgetting"]["kl"] > 0 and text["scores"]["perplexity"] > 1
    assert saved["drift"]["mean"] > 0 and set(saved["router"]["knowledge/capital"]) == {"knowledge", "task"}
    markdown = (tmp_path / "eval.md").read_text()
    assert "| knowledge/capital |" in markdown and "Forgetting on general text" in markdown
    assert (tmp_path / "router.png").is_file() and (tmp_path / "router.json").is_file()


def test_eval_cli_and_errors(tiny_run, tmp_path):
    cli_main(["eval", "--model", str(tiny_run / "model"), "--suite", LM_LOSS, "--limit", "2",
              "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert list(saved["benchmarks"]) == ["text/wikipedia"] and "drift" not in saved
    cli_main(["eval", "--model", str(tiny_run / "model"), "--adapter", str(tiny_run / "adapter"), "--suite", LM_LOSS,
              "--limit", "2", "--output", str(tmp_path), "--vs-base", "--overwrite"])  # bare switches
    assert "forgetting" in json.loads((tmp_path / "eval.json").read_text())["benchmarks"]["text/wikipedia"]
    with pytest.raises(ValueError, match="--base-model"):
        evaluate(model=str(tiny_run / "model"), suite=LM_LOSS, vs_base=True, output=tmp_path / "no-base", limit=2)


def test_eval_against_a_saved_base_eval_on_items_the_training_data_does_not_give_away(tiny_run, tmp_path):
    from loramoe.suites import load_benchmark

    given_away = load_benchmark("knowledge/capital", limit=4).test[0]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(json.dumps({"instruction": given_away.prompt, "output": given_away.answers[0]}) + "\n")
    settings = {"suite": "knowledge/capital,text/wikipedia", "limit": {KNOWLEDGE: 4, LM_LOSS: 2},
                "train_data": [str(train_file)], "max_new_tokens": 3, "batch_size": 4}
    base = evaluate(model=str(tiny_run / "model"), output=tmp_path / "base", **settings)
    capital = base["benchmarks"]["knowledge/capital"]
    assert capital["overlap"]["removed"]["question"] == 1 and capital["test_items"] == 3
    assert given_away.id not in [item["id"] for item in capital["items"]]
    assert base["benchmarks"]["text/wikipedia"]["test_items"] == 2

    tuned = evaluate(model=str(tiny_run / "model"), adapter=tiny_run / "adapter",
                     base_eval=tmp_path / "base" / "eval.json", output=tmp_path / "tuned", **settings)
    entry = tuned["benchmarks"]["knowledge/capital"]
    assert entry["base_scores"] == capital["scores"] and "change" in entry
    assert [i["base_prediction"] for i in entry["items"]] == [i["prediction"] for i in capital["items"]]
    assert tuned["benchmarks"]["text/wikipedia"]["forgetting"]["kl"] > 0

    with pytest.raises(ValueError, match="other test items"):
        evaluate(model=str(tiny_run / "model"), adapter=tiny_run / "adapter", base_eval=tmp_path / "base" / "eval.json",
                 output=tmp_path / "other", **{**settings, "limit": 2})
    with pytest.raises(ValueError, match="unknown suites or benchmarks: knowlege"):
        evaluate(model=str(tiny_run / "model"), suite=LM_LOSS, limit={"knowlege": 2}, output=tmp_path)


BASE_EVAL_BENCHMARKS = [
    Benchmark("knowledge/capital", "knowledge", "qa", "chat",
              test=[Example(id=f"capital/{c}/0", prompt=f"The capital of {c}?", answers=(a,))
                    for c, a in (("France", "Paris"), ("Peru", "Lima"))]),
    Benchmark("text/wikipedia", "text", "lm_loss", "completion", test=[Example(id="wikipedia/Lima", prompt="Lima")]),
]
BASE_EVAL = {"benchmarks": {"knowledge/capital": {
    "scores": {"em": 50.0, "f1": 50.0, "contains": 50.0},
    "items": [{"id": "capital/France/0", "prediction": "Paris", "contains": 100.0},
              {"id": "capital/Peru/0", "prediction": "Quito", "contains": 0.0}]}}}


def _base_eval(edit) -> bytes:
    document = copy.deepcopy(BASE_EVAL)
    edit(document["benchmarks"]["knowledge/capital"])
    return json.dumps(document).encode()


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "not an eval.json"),
    (b"3", "not an eval.json"),
    (b'"eval"', "not an eval.json"),
    (b"\xff\xfe{\x00}\x00", r"not a readable eval.json \('utf-8' codec can't decode byte 0xff"),
    (b'{"benchmarks": ["knowledge/capital"]}', "not an eval.json"),
    (b'{"benchmarks": {"knowledge/capital": 5}}', "no items for benchmark 'knowledge/capital'"),
    (_base_eval(lambda e: e.update(items={"capital/France/0": {}})), "no items for benchmark 'knowledge/capital'"),
    (_base_eval(lambda e: e["items"].__setitem__(1, "Lima")),
     "benchmark 'knowledge/capital': item 1 is not a JSON object"),
    (_base_eval(lambda e: e["items"][0].pop("id")), "item 0: 'id' must be a string, got None"),
    (_base_eval(lambda e: e["items"][1].pop("prediction")), "item 1: 'prediction' must be a string, got None"),
    (_base_eval(lambda e: e["items"][1].update(contains="no")), "item 1: 'contains' must be a number, got 'no'"),
    (_base_eval(lambda e: e["items"][1].update(contains=False)), "item 1: 'contains' must be a number, got False"),
    (_base_eval(lambda e: e.pop("scores")), "'scores' must map metric names to numbers"),
    (_base_eval(lambda e: e["scores"].update(em="high")), "'scores' must map metric names to numbers"),
    (_base_eval(lambda e: e["items"].pop()), "scored on other test items"),
])
def test_a_base_eval_that_is_not_a_matching_eval_json_is_one_line_naming_the_file(tmp_path, content, message):
    file = tmp_path / "eval.json"
    file.write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        _read_base_eval(file, BASE_EVAL_BENCHMARKS)
    assert str(caught.value).startswith(f"--base-eval {file}: ") and "\n" not in str(caught.value)


def test_a_base_eval_with_what_the_comparison_reads_is_read(tmp_path):
    file = tmp_path / "eval.json"
    file.write_bytes(_base_eval(lambda e: None))
    assert _read_base_eval(file, BASE_EVAL_BENCHMARKS) == BASE_EVAL["benchmarks"]


def test_an_unwritable_output_fails_before_any_model_is_loaded(tmp_path, monkeypatch):
    import loramoe.evaluate.main as evaluate_module

    def never(*_, **__):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(evaluate_module.models, "load", never)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(OutputFolderError, match="--output .*taken: not a folder"):
        evaluate(model="never-loaded", suite=LM_LOSS, output=tmp_path / "taken")
    with pytest.raises(OutputFolderError, match="--output .*taken/sub: cannot write there"):
        evaluate(model="never-loaded", suite=LM_LOSS, output=tmp_path / "taken" / "sub")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere: the mode cannot make it fail then
        with pytest.raises(OutputFolderError, match="--output .*locked: cannot write there"):
            evaluate(model="never-loaded", suite=LM_LOSS, output=locked)
    with pytest.raises(UsageError, match="--suite ',' names nothing"):
        evaluate(model="never-loaded", suite=",", output=tmp_path / "out")
