"""lm-eval against the lab's own scoring on the embedded SmolLM2-135M: the exported capital task's
``acc`` is the lab probe's multiple-choice share for capitals and ``acc_norm`` its ``mc_norm``,
without an adapter and with the LoRAMoE adapter of a short ``loramoe train`` run. Two programs, one
of them not ours, scoring the same facts alike on the real model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loramoe import models
from loramoe.evaluate import evaluate
from loramoe.lab.measures import Lengths, fact_measures
from loramoe.lab.scoring import answer_ids
from loramoe.likelihood import continuation_logprobs
from loramoe.serialization import load_adapter
from loramoe.train import train

lm_eval = pytest.importorskip("lm_eval")
tasks = pytest.importorskip("lm_eval.tasks")
pytest.importorskip("loramoe.harness")
from tests.test_harness import _offline  # after the skips: that module needs lm-eval

pytestmark = pytest.mark.realmodel
RELATION = "capital"
TASK = f"loramoe_probe_{RELATION}_mc"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The probe exported by ``loramoe eval`` on the embedded model, and a LoRAMoE adapter trained a
    few steps at a high rate (so that it moves the scores), all offline."""
    root = tmp_path_factory.mktemp("realmodel-harness")
    with pytest.MonkeyPatch.context() as patch:
        _offline(patch)
        evaluate(model="smollm2-135m", export_harness=root / "probe")
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps({"instruction": f"Name a country whose capital starts with {c}.",
                                            "output": f"One starts with {c}."}) + "\n" for c in "ABCDEFGH"))
        train(data=[str(data)], model="smollm2-135m", method="loramoe", output=root / "run", max_steps=3,
              lr=1e-2, batch_size=4, max_length=64, precision="fp32")
        yield root


def _lab_scores(root: Path, adapter: Path | None) -> dict[str, np.ndarray]:
    """The lab's ``mc`` and ``mc_norm`` (:mod:`loramoe.lab.measures`) on the exported facts."""
    model, tokenizer = models.load("smollm2-135m")
    if adapter is not None:
        load_adapter(model, adapter)
    rows = json.loads((root / "probe" / "data" / f"{RELATION}.json").read_text(encoding="utf-8"))
    choices = [[answer_ids(tokenizer, a) for a in r["choices"]] for r in rows]
    scored = continuation_logprobs(model, [tokenizer(r["statement"])["input_ids"] for r in rows], choices,
                                   pad_id=tokenizer.pad_token_id)
    lengths = Lengths(np.array([[len(a) for a in r["choices"]] for r in rows], dtype=float),
                      np.array([[len(c) for c in cs] for cs in choices], dtype=float))
    return fact_measures({"choices": [[sum(c) for c in lp] for lp in scored.logprobs]}, lengths)


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_lm_eval_acc_on_the_real_model_is_the_lab_probe_share(exported, with_adapter, monkeypatch):
    _offline(monkeypatch)
    threads = torch.get_num_threads()
    adapter = exported / "run" if with_adapter else None
    args = "pretrained=smollm2-135m" + (f",adapter={adapter}" if adapter else "")
    try:
        manager = tasks.TaskManager(include_path=str(exported / "probe"), include_defaults=False)
        result = lm_eval.simple_evaluate(model="loramoe", model_args=args, tasks=[TASK], batch_size=32,
                                         task_manager=manager)["results"][TASK]
    finally:
        torch.set_num_threads(threads)
    lab = _lab_scores(exported, adapter)
    facts = len(lab["mc"])
    assert facts >= 40 and 50 < lab["mc"].mean() < 100  # the base model knows most capitals
    # the same sums in another batch may differ in the last float bits: at most one near-tie may flip
    assert abs(result["acc,none"] - lab["mc"].mean() / 100) <= 1 / facts + 1e-9
    assert abs(result["acc_norm,none"] - lab["mc_norm"].mean() / 100) <= 1 / facts + 1e-9


def test_the_adapter_moves_the_scores_it_is_checked_on(exported):
    """The adapter run is no no-op: its log-probabilities differ from the base model's, so the
    cross-check above compares two different models, not one twice."""
    base, tuned = _lab_scores(exported, None), _lab_scores(exported, exported / "run")
    assert not np.allclose(base["gold_logprob"], tuned["gold_logprob"], atol=1e-3)
