"""``loramoe eval --harness``: lm-eval tasks in the layout ``--export-harness`` writes, scored on the
model ``loramoe eval`` loaded, on a tiny random Llama with a LoRAMoE adapter, offline: lm-eval's
files, eval.json's numbers against lm-eval's own run, and with ``--vs-base`` the change paired by
document against the two sample logs. Any attempt to reach the network fails the test at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loramoe
from loramoe import LoraMoEConfig
from loramoe.cli import main as cli_main
from loramoe.errors import UsageError
from loramoe.evaluate import evaluate, harness_export
from loramoe.evaluate.harness_run import HUB_OFFLINE
from tests.conftest import save_tiny, tiny_llama

lm_eval = pytest.importorskip("lm_eval")
tasks = pytest.importorskip("lm_eval.tasks")
pytest.importorskip("loramoe.harness")
datasets = pytest.importorskip("datasets")
huggingface_hub = pytest.importorskip("huggingface_hub")
from tests.test_harness import _offline  # after the skips: that module needs lm-eval

RELATION = "tiny"
MC, GEN = f"loramoe_probe_{RELATION}_mc", f"loramoe_probe_{RELATION}_gen"
# the probe's rows over the tiny tokenizer's words: a statement of 2-5 words, the gold answer first,
# every answer one word, so that which one wins is up to the model, not to the answers' lengths
FACTS = [{"id": f"tiny/{i}", "statement": " ".join(f"w{2 + (3 * i + k) % 40}" for k in range(2 + i % 4)),
          "gold": f"w{50 + i}", "choices": [f"w{50 + i}", f"w{60 + i}", f"w{80 - i}"],
          "aliases": [f"w{50 + i}"]} for i in range(10)]
SUITE = "text/wikipedia"  # the quickest built-in benchmark: the harness table sits beside it


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        _offline(patch)
        yield


def _adapter(folder: Path, *, zero_b: bool) -> Path:
    """A LoRAMoE adapter with random experts and router; with ``zero_b`` its B matrices zero, so
    the model scores exactly as its base."""
    model = loramoe.attach(tiny_llama(), LoraMoEConfig(num_experts=3, r=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in loramoe.adapter_layers(model):
            for key, tensor in layer.adapter_state().items():
                tensor.copy_(torch.zeros_like(tensor) if zero_b and key == "lora_B" else
                             torch.randn(tensor.shape, generator=g))
    return loramoe.save_adapter(model, folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """The model folder, two adapters and a task folder as ``--export-harness`` writes it (its loader,
    task YAMLs and groups), holding one relation of made-up facts."""
    root = tmp_path_factory.mktemp("eval_harness")
    save_tiny(root / "model")
    folder = root / "tasks"
    (folder / "data").mkdir(parents=True)
    (folder / "loader.py").write_text(harness_export.LOADER)
    (folder / "data" / f"{RELATION}.json").write_text(json.dumps(FACTS))
    for name, text in harness_export._tasks(RELATION, max_new_tokens=4).items():
        (folder / f"{name}.yaml").write_text(text)
    (folder / "loramoe_probe_mc.yaml").write_text(harness_export._group("loramoe_probe_mc", [MC], ["acc", "acc_norm"]))
    return {"model": root / "model", "tasks": folder, "adapter": _adapter(root / "adapter", zero_b=False),
            "zero": _adapter(root / "zero", zero_b=True)}


def _eval(setup: dict[str, Path], output: Path, adapter: str | None = "adapter", **options) -> dict:
    settings = {"suite": SUITE, "limit": 8, "batch_size": 4, "include_path": setup["tasks"], **options}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate(model=str(setup["model"]), adapter=setup[adapter] if adapter else None, output=output,
                        **settings)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vs_base(setup, tmp_path_factory) -> tuple[dict, Path]:
    output = tmp_path_factory.mktemp("vs_base")
    return _eval(setup, output, harness=["loramoe_probe_mc", GEN], vs_base=True), output


def _lm_eval(setup: dict[str, Path], model_args: str) -> dict:
    """lm-eval's own run of the multiple-choice task with the registered ``loramoe`` model."""
    manager = tasks.TaskManager(include_path=str(setup["tasks"]), include_defaults=False)
    return lm_eval.simple_evaluate(model="loramoe", model_args=model_args, tasks=[MC], limit=8, batch_size=4,
                                   task_manager=manager)["results"][MC]


def _log(path: Path) -> dict[int, dict]:
    return {row["doc_id"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_lm_eval_files_and_eval_numbers_are_lm_evals(setup, vs_base, one_thread):
    results, output = vs_base
    saved = json.loads((output / "eval.json").read_text())
    assert saved == json.loads(json.dumps(results))
    written = json.loads((output / "harness" / "results.json").read_text())
    assert set(written["results"]) == {MC, GEN, "loramoe_probe_mc"} and set(written["groups"]) == {"loramoe_probe_mc"}
    assert {"configs", "versions", "n-samples", "n-shot"} <= set(written) and "samples" not in written
    for folder in (output / "harness", output / "harness" / "base"):
        assert set(_log(folder / f"samples_{MC}.jsonl")) == set(_log(folder / f"samples_{GEN}.jsonl")) == set(range(8))
    harness = saved["harness"]["tasks"]
    for task, entry in written["results"].items():
        for key, numbers in harness[task]["metrics"].items():
            metric, _, kept = key.partition(",")
            assert numbers["value"] == entry[key] and numbers["stderr"] == entry[f"{metric}_stderr,{kept}"]
    assert set(harness[MC]["metrics"]) == {"acc,none", "acc_norm,none"} and harness[MC]["documents"] == 8
    ours = _lm_eval(setup, f"pretrained={setup['model']},adapter={setup['adapter']}")
    base = _lm_eval(setup, f"pretrained={setup['model']}")
    for key in ("acc,none", "acc_norm,none"):
        assert harness[MC]["metrics"][key]["value"] == pytest.approx(ours[key], abs=1e-12)
        assert harness[MC]["metrics"][key]["base"] == pytest.approx(base[key], abs=1e-12)
    markdown = (output / "eval.md").read_text()
    assert f"| {SUITE} |" in markdown and "## lm-evaluation-harness" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {MC} | acc |"))
    assert f"| {harness[MC]['metrics']['acc,none']['value']:.3f} |" in row and row.endswith("| 8 | 0 |")
    assert "| loramoe_probe_mc (group) | acc |" in markdown and f"| {GEN} | exact_match |" in markdown


def test_the_change_is_paired_by_document_from_the_two_sample_logs(vs_base):
    results, output = vs_base
    tuned, base = (_log(folder / f"samples_{MC}.jsonl") for folder in (output / "harness", output / "harness" / "base"))
    assert all(tuned[d]["prompt_hash"] == base[d]["prompt_hash"] for d in tuned)
    changed = 0
    for key in ("acc", "acc_norm"):
        diffs = [tuned[d][key] - base[d][key] for d in sorted(tuned)]
        changed += sum(diff != 0 for diff in diffs)
        numbers = results["harness"]["tasks"][MC]["metrics"][f"{key},none"]
        assert numbers["change"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
        assert numbers["change"] == pytest.approx(numbers["value"] - numbers["base"], abs=1e-12)
        low, high = numbers["ci95"]
        assert low <= numbers["change"] <= high and numbers["documents"] == 8
    assert changed > 0  # the adapter changes some answers: the pairing is not met trivially
    group = results["harness"]["tasks"]["loramoe_probe_mc"]["metrics"]["acc,none"]
    assert "change" not in group and group["base"] is not None  # a group pools its tasks: no pairing of its own
    assert "ci95" in results["harness"]["tasks"][GEN]["metrics"]["exact_match,none"]
    markdown = (output / "eval.md").read_text()
    acc = results["harness"]["tasks"][MC]["metrics"]["acc,none"]
    assert f"| {acc['change']:.3f} | [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}] |" in markdown


def test_an_adapter_with_zero_b_changes_nothing(setup, tmp_path):
    results = _eval(setup, tmp_path, adapter="zero", harness=[MC], vs_base=True)
    for numbers in results["harness"]["tasks"][MC]["metrics"].values():
        assert numbers["change"] == 0 and numbers["ci95"] == [0, 0] and numbers["value"] == numbers["base"]


def test_a_model_without_an_adapter_is_compared_with_its_base_model(setup, tmp_path):
    with pytest.raises(UsageError, match="^--vs-base on a model without an adapter needs --base-model$"):
        _eval(setup, tmp_path / "refused", adapter=None, harness=[MC], vs_base=True)
    results = _eval(setup, tmp_path / "same", adapter=None, harness=[MC], vs_base=True,
                    base_model=str(setup["model"]))  # the same weights loaded twice: nothing changes
    for numbers in results["harness"]["tasks"][MC]["metrics"].values():
        assert numbers["change"] == 0 and numbers["value"] == numbers["base"]
    config = json.loads((tmp_path / "same" / "harness" / "base" / "results.json").read_text())["config"]
    assert config["adapter"] is None


def test_offline_a_task_whose_data_is_on_the_hub_is_one_line_naming_it(setup, tmp_path, monkeypatch):
    # an empty cache: a copy of the data on this machine would be read offline, and rightly
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UsageError) as caught:
        _eval(setup, tmp_path / "out", harness=["arc_easy"])
    assert str(caught.value) == HUB_OFFLINE.format("arc_easy") and "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "eval.json").exists()


def test_an_unknown_task_is_one_line_with_close_matches(setup, tmp_path):
    with pytest.raises(UsageError, match=f"^--harness: unknown task '{MC}x'; close matches: {MC}") as caught:
        _eval(setup, tmp_path, harness=[f"{MC}x"])
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="^--limit: with --harness give one number"):
        _eval(setup, tmp_path, harness=[MC], limit={"lm-loss": 2})


def test_the_command_line_scores_the_tasks(setup, tmp_path, capsys, one_thread):
    cli_main(["eval", "--model", str(setup["model"]), "--adapter", str(setup["adapter"]), "--harness", f"{MC},{GEN}",
              "--include-path", str(setup["tasks"]), "--limit", "2", "--output", str(tmp_path),
              "--num-fewshot", "1"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved["harness"]["tasks"]) == {MC, GEN} and saved["harness"]["tasks"][MC]["num_fewshot"] == 1
    assert saved["harness"]["tasks"][MC]["documents"] == 2 and "benchmarks" in saved
    assert (tmp_path / "harness" / f"samples_{GEN}.jsonl").is_file()
    assert not (tmp_path / "harness" / "base").exists()
    again = ["eval", "--model", str(setup["model"]), "--suite", "lm-loss", "--limit", "2", "--output", str(tmp_path)]
    with pytest.raises(SystemExit):  # the harness results are an earlier evaluation too
        cli_main(again)
    assert "harness/results.json" in capsys.readouterr().err
    cli_main([*again, "--overwrite"])
    assert not list((tmp_path / "harness").iterdir())  # they would pass for this evaluation's
