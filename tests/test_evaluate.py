"""`loramoe eval` end to end on a tiny model with a saved LoRAMoE adapter and the built-in suites."""

from __future__ import annotations

import json

import pytest
import torch

import loramoe
from loramoe import LoraMoEConfig
from loramoe.cli import main as cli_main
from loramoe.evaluate import evaluate
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
    results = evaluate(model=str(tiny_run / "model"), adapter=tiny_run / "adapter", suite="knowledge,tasks,lm-loss",
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
    cli_main(["eval", "--model", str(tiny_run / "model"), "--suite", "lm-loss", "--limit", "2",
              "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert list(saved["benchmarks"]) == ["text/wikipedia"] and "drift" not in saved
    cli_main(["eval", "--model", str(tiny_run / "model"), "--adapter", str(tiny_run / "adapter"), "--suite", "lm-loss",
              "--limit", "2", "--output", str(tmp_path), "--vs-base"])  # a bare switch
    assert "forgetting" in json.loads((tmp_path / "eval.json").read_text())["benchmarks"]["text/wikipedia"]
    with pytest.raises(ValueError, match="--base-model"):
        evaluate(model=str(tiny_run / "model"), suite="lm-loss", vs_base=True, output=tmp_path, limit=2)


def test_eval_against_a_saved_base_eval_on_items_the_training_data_does_not_give_away(tiny_run, tmp_path):
    from loramoe.suites import load_benchmark

    given_away = load_benchmark("knowledge/capital", limit=4).test[0]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(json.dumps({"instruction": given_away.prompt, "output": given_away.answers[0]}) + "\n")
    settings = dict(suite="knowledge/capital,text/wikipedia", limit={"knowledge": 4, "lm-loss": 2},
                    train_data=[str(train_file)], max_new_tokens=3, batch_size=4)
    base = evaluate(model=str(tiny_run / "model"), output=tmp_path / "base", **settings)
    capital = base["benchmarks"]["knowledge/capital"]
    assert capital["overlap"]["removed"]["question"] == 1 and capital["test_items"] == 3
    assert given_away.id not in [item["id"] for item in capital["items"]]
    assert base["benchmarks"]["text/wikipedia"]["test_items"] == 2

    tuned = evaluate(model=str(tiny_run / "model"), adapter=tiny_run / "adapter", base_eval=tmp_path / "base" / "eval.json",
                     output=tmp_path / "tuned", **settings)
    entry = tuned["benchmarks"]["knowledge/capital"]
    assert entry["base_scores"] == capital["scores"] and "change" in entry
    assert [i["base_prediction"] for i in entry["items"]] == [i["prediction"] for i in capital["items"]]
    assert tuned["benchmarks"]["text/wikipedia"]["forgetting"]["kl"] > 0

    with pytest.raises(ValueError, match="other test items"):
        evaluate(model=str(tiny_run / "model"), adapter=tiny_run / "adapter", base_eval=tmp_path / "base" / "eval.json",
                 output=tmp_path / "other", **{**settings, "limit": 2})
    with pytest.raises(ValueError, match="unknown suites or benchmarks: knowlege"):
        evaluate(model=str(tiny_run / "model"), suite="lm-loss", limit={"knowlege": 2}, output=tmp_path)
