"""``loramoe eval --export-harness``: the lab's knowledge probe written as lm-eval tasks, run by
lm-eval itself on a tiny random Llama, offline, from a moved copy of the folder: its ``acc`` and
``acc_norm`` equal the lab's ``mc`` and ``mc_norm`` on the same facts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as token_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loramoe import models
from loramoe.cli import main as cli_main
from loramoe.evaluate import evaluate
from loramoe.evaluate.harness_export import IGNORED, lab_probe
from loramoe.lab.config import load_config
from loramoe.lab.measures import candidate_lengths, fact_measures
from loramoe.lab.scoring import answer_ids, choose_gold
from loramoe.likelihood import continuation_logprobs

lm_eval = pytest.importorskip("lm_eval")
tasks = pytest.importorskip("lm_eval.tasks")
pytest.importorskip("loramoe.harness")
from tests.test_harness import _offline  # after the skips: that module needs lm-eval

RELATION = "borders"  # the relation of fewest facts


def _byte_model(folder: Path) -> None:
    """A tiny random Llama with one token per byte: the conftest tokenizer knows only the words
    w0..w95, so every fact would be [UNK] and the choices would tie."""
    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    backend = Tokenizer(token_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=None, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        _offline(patch)
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """The model folder and the export, written by ``loramoe eval`` and then moved elsewhere."""
    root = tmp_path_factory.mktemp("export")
    _byte_model(root / "model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate(model=str(root / "model"), export_harness=root / "written")
    finally:
        torch.set_num_threads(threads)
    (root / "moved").mkdir()
    shutil.move(root / "written", root / "moved" / "probe")
    return {"model": root / "model", "tasks": root / "moved" / "probe", "root": root}


def _run(exported: dict[str, Path], task: str, **options) -> dict:
    manager = tasks.TaskManager(include_path=str(exported["tasks"]), include_defaults=False)
    return lm_eval.simple_evaluate(model="loramoe", model_args=f"pretrained={exported['model']}", tasks=[task],
                                   batch_size=32, task_manager=manager, **options)


def test_lm_eval_acc_is_the_lab_mc_on_the_same_facts(exported, monkeypatch, tmp_path, one_thread):
    monkeypatch.chdir(tmp_path)  # the data is found beside the YAMLs, not in the working directory
    result = _run(exported, f"loramoe_probe_{RELATION}_mc")["results"][f"loramoe_probe_{RELATION}_mc"]
    settings = load_config()
    probe = lab_probe(settings)
    model, tokenizer = models.load(str(exported["model"]))
    gold = choose_gold(model, tokenizer, probe, batch_size=settings.score.batch_size,
                       precision=settings.score.precision)
    rows = json.loads((exported["tasks"] / "data" / f"{RELATION}.json").read_text(encoding="utf-8"))
    mine = [i for i, f in enumerate(probe.facts) if f.example.relation == RELATION]
    assert [(r["statement"], r["choices"]) for r in rows] == \
        [(probe.facts[i].statement, [gold[i], *probe.facts[i].distractors]) for i in mine]
    probe.facts = [probe.facts[i] for i in mine]
    gold = [gold[i] for i in mine]
    scored = continuation_logprobs(model, [tokenizer(f.statement)["input_ids"] for f in probe.facts],
                                   [[answer_ids(tokenizer, a) for a in r["choices"]] for r in rows],
                                   pad_id=tokenizer.pad_token_id)
    point = {"choices": [[sum(c) for c in lp] for lp in scored.logprobs]}
    lab = fact_measures(point, candidate_lengths(tokenizer, probe, gold))
    assert 0 < lab["mc"].mean() < 100 and not np.array_equal(lab["mc"], lab["mc_norm"])
    assert result["acc,none"] == pytest.approx(lab["mc"].mean() / 100)
    assert result["acc_norm,none"] == pytest.approx(lab["mc_norm"].mean() / 100)


def test_the_generation_task_runs_with_its_exact_match_rule(exported, one_thread):
    result = _run(exported, "loramoe_probe_capital_gen", limit=4)
    assert 0 <= result["results"]["loramoe_probe_capital_gen"]["exact_match,none"] <= 1
    from lm_eval.api.metrics import exact_match_hf_evaluate

    def match(prediction: str, alias: str) -> float:
        return exact_match_hf_evaluate([prediction], [alias], regexes_to_ignore=IGNORED, ignore_case=True,
                                       ignore_punctuation=True)["exact_match"]

    assert match(" the Bahamas", "The Bahamas") == match(" Saint-Denis", "Saint Denis") == 1
    assert match(" Bahamas", "The Bahamas") == match(" LIMA", "Lima") == 1
    assert match(" Lima Peru", "Lima") == 0


def test_the_tasks_name_only_files_inside_the_folder(exported):
    folder = exported["tasks"]
    names = {p.stem for p in folder.glob("*.yaml")}
    assert {"loramoe_probe", "loramoe_probe_mc", "loramoe_probe_gen", f"loramoe_probe_{RELATION}_mc"} <= names
    for path in folder.glob("*.yaml"):
        text = path.read_text()
        assert str(exported["root"]) not in text and not re.search(r'(^|[" ])/', text, re.MULTILINE)
        for data in re.findall(r'"data_file": "([^"]+)"', text):
            assert (folder / data).is_file()
        assert "custom_dataset" not in text or "!function loader.load" in text
    assert (folder / "loader.py").is_file()


def test_a_second_export_into_the_folder_is_refused_in_one_line(exported, capsys):
    with pytest.raises(SystemExit) as exit:
        cli_main(["eval", "--export-harness", str(exported["tasks"]), "--model", str(exported["model"])])
    assert exit.value.code == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"loramoe: error: --export-harness {exported['tasks']}: "
                                                  "the folder is not empty")
