"""lm-eval's model ``loramoe`` (:mod:`loramoe.harness`) on a tiny random Llama saved as a local
folder, with each adapter kind saved as a folder, on a local JSON multiple-choice task: lm-eval's
own per-choice log-likelihoods and ``acc`` are checked against :mod:`loramoe.likelihood` and the
lab's multiple-choice rule. Offline: any attempt to reach the network fails the test at once."""

from __future__ import annotations

import json
import re
import socket
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import loramoe
from loramoe import LoraConfig, LoraMoEConfig, TiedLoraConfig
from loramoe.errors import MissingFileError, UsageError
from loramoe.lab.scoring import answer_ids
from loramoe.likelihood import continuation_logprobs
from tests.conftest import save_tiny, tiny_llama

lm_eval = pytest.importorskip("lm_eval")
tasks = pytest.importorskip("lm_eval.tasks")
harness = pytest.importorskip("loramoe.harness")
huggingface_hub = pytest.importorskip("huggingface_hub")
datasets = pytest.importorskip("datasets")

KINDS = {"lora": LoraConfig(r=2), "tied-lora": TiedLoraConfig(r=2), "loramoe": LoraMoEConfig(num_experts=3, r=2)}
# contexts of 2-5 words and choices of 1-3 tokens, so lm-eval's batches pad and its continuations
# span several tokens; w0 (pad) and w1 (EOS) are left out
ITEMS = [{"question": " ".join(f"w{2 + (3 * i + k) % 40}" for k in range(2 + i % 4)),
          "choices": [f"w{50 + i}", f"w{60 + i} w{70 + i}", f"w{80 - i} w{42 + i} w{88 - i}"], "gold": i % 3}
         for i in range(8)]
TASK = "tiny_mc"


def _offline(patch: pytest.MonkeyPatch) -> None:
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read the variables once, at import, which came before this
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def refuse(sock: socket.socket, address: object) -> None:
        raise RuntimeError(f"offline test tried to connect to {address}")

    patch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The model folder, one adapter folder per kind (random weights, so each changes the model)
    and a task folder: the task YAML and its JSON data."""
    root = tmp_path_factory.mktemp("harness")
    save_tiny(root / "model")
    out = {"model": root / "model", "tasks": root / "tasks"}
    for seed, (kind, config) in enumerate(KINDS.items()):
        model = loramoe.attach(tiny_llama(), config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in loramoe.adapter_layers(model):
                for tensor in layer.adapter_state().values():
                    tensor.copy_(torch.randn(tensor.shape, generator=g))
        out[kind] = loramoe.save_adapter(model, root / kind)
    out["tasks"].mkdir()
    (root / "data.json").write_text(json.dumps(ITEMS))
    (out["tasks"] / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'data.json'}\n  cache_dir: {root / 'cache'}\n"
        "test_split: test\nfewshot_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return out


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        _offline(patch)
        yield


def _evaluate(folders: dict[str, Path], model: str | object, **options) -> dict:
    manager = tasks.TaskManager(include_path=str(folders["tasks"]), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=[TASK], log_samples=True, batch_size=4, task_manager=manager,
                                   **options)


def _loglikelihoods(result: dict) -> dict[int, list[float]]:
    """Per document, lm-eval's log-likelihood of each choice."""
    return {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in result["samples"][TASK]}


def _args(folders: dict[str, Path], kind: str | None = None) -> str:
    return f"pretrained={folders['model']}" + (f",adapter={folders[kind]}" if kind else "")


@pytest.fixture(scope="module")
def base_run(folders) -> dict:
    return _evaluate(folders, "loramoe", model_args=_args(folders))


def _gold_wins(scores: list[float], gold: int) -> float:
    """The lab's multiple choice (loramoe.lab): right when the gold answer's score is the largest."""
    return float(scores[gold] > max(s for j, s in enumerate(scores) if j != gold))


def test_lm_eval_scores_equal_loramoe_likelihood_and_the_lab_rule(folders, one_thread):
    result = _evaluate(folders, "loramoe", model_args=_args(folders, "loramoe"), num_fewshot=1, limit=6)
    samples = result["samples"][TASK]
    assert len(samples) == 6 and all("\n\n" in s["arguments"][0][0] for s in samples)  # limit, few-shot
    model, tokenizer = loramoe.models.load(str(folders["model"]))
    loramoe.load_adapter(model, folders["loramoe"])
    for s in samples:
        assert [cont for _, cont in s["arguments"]] == [" " + c for c in s["doc"]["choices"]]
    scored = continuation_logprobs(model, [tokenizer(s["arguments"][0][0])["input_ids"] for s in samples],
                                   [[answer_ids(tokenizer, c) for c in s["doc"]["choices"]] for s in samples],
                                   pad_id=tokenizer.pad_token_id)
    ours = [[sum(tokens) for tokens in choice] for choice in scored.logprobs]
    theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
    assert torch.allclose(torch.tensor(theirs), torch.tensor(ours), rtol=0, atol=1e-4)
    golds = [s["doc"]["gold"] for s in samples]
    mc = [_gold_wins(o, g) for o, g in zip(ours, golds)]
    # lm-eval's acc_norm: each choice's log-likelihood over its length in characters
    mc_norm = [_gold_wins([v / len(c) for v, c in zip(o, s["doc"]["choices"])], g)
               for o, g, s in zip(ours, golds, samples)]
    assert [s["acc"] for s in samples] == mc and [s["acc_norm"] for s in samples] == mc_norm
    assert 0 < sum(mc) < len(mc)  # both right and wrong answers: the rule is not met trivially
    assert result["results"][TASK]["acc,none"] == pytest.approx(sum(mc) / len(mc))
    assert result["config"]["adapter_method"] == "loramoe"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_adapter_kind_is_loaded_and_changes_the_scores(folders, base_run, kind, one_thread):
    result = _evaluate(folders, "loramoe", model_args=_args(folders, kind))
    tuned, base = _loglikelihoods(result), _loglikelihoods(base_run)
    assert tuned.keys() == base.keys() == set(range(len(ITEMS)))
    assert all(abs(a - b) > 1e-3 for doc in tuned for a, b in zip(tuned[doc], base[doc]))
    assert result["config"]["adapter_method"] == kind


def test_without_adapter_scores_the_base_from_the_same_load(folders, base_run, one_thread):
    lm = harness.LoramoeLM(pretrained=str(folders["model"]), adapter=str(folders["loramoe"]), batch_size=4)
    with lm.without_adapter():
        off = _loglikelihoods(_evaluate(folders, lm))
    on = _loglikelihoods(_evaluate(folders, lm))
    base = _loglikelihoods(base_run)
    assert all(torch.allclose(torch.tensor(off[d]), torch.tensor(base[d]), rtol=0, atol=1e-6) for d in base)
    assert all(abs(a - b) > 1e-3 for d in base for a, b in zip(on[d], base[d]))


def test_a_missing_adapter_folder_is_one_line_naming_it(folders, tmp_path):
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(MissingFileError, match=f"^adapter={missing}: no such folder") as error:
        _evaluate(folders, "loramoe", model_args=f"pretrained={folders['model']},adapter={missing}")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("option", ["adpater", "peft"])
def test_an_option_the_model_would_drop_is_refused(folders, option):
    with pytest.raises(UsageError, match=f"^model_args {option}: not an option of the loramoe model"):
        _evaluate(folders, "loramoe", model_args=f"{_args(folders)},{option}={folders['lora']}")


def test_the_command_line_runs_lm_eval_with_the_model_registered(folders, tmp_path, monkeypatch, capsys, one_thread):
    from loramoe.harness.__main__ import main

    # lm-eval's command line indexes its thousands of built-in tasks first, most of a run's time here;
    # and its log handler would hold on to this test's captured stderr
    monkeypatch.setattr(tasks, "TaskManager", partial(tasks.TaskManager, include_defaults=False))
    monkeypatch.setattr("lm_eval.__main__.setup_logging", lambda: None)
    def command(model_args: str) -> list[str]:  # a new list each time: lm-eval inserts its `run` into argv
        return ["python -m loramoe.harness", "--model", "loramoe", "--model_args", model_args,
                "--include_path", str(folders["tasks"]), "--tasks", TASK]

    monkeypatch.setattr(sys, "argv", command(_args(folders, "lora")))
    main()
    assert re.search(rf"^\|{TASK}\s*\|.*\|acc\s*\|", capsys.readouterr().out, re.MULTILINE)
    missing = tmp_path / "gone"
    monkeypatch.setattr(sys, "argv", command(f"{_args(folders)},adapter={missing}"))
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"loramoe: error: adapter={missing}: no such folder")
