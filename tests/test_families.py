"""Every family of the targets table, proven on a tiny random model of it (tests/families.py): per
family and adapter kind, the default targets are the feed-forward projections, one training step
with the trainer saves an adapter that loads into a fresh model with the trained model's logits, the
loaded model generates greedily, and LoRAMoE's fused layers compute what the loop over experts does.
A family whose feed-forward layers no adapter can wrap asks for ``target_modules``, and works with it."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from transformers import TrainerCallback

import loramoe
from loramoe import TargetError, models
from loramoe.adapters import LAYER_CLASSES, LoraMoEConfig, LoraMoELinear
from loramoe.attach import adapter_layers, disabled_adapters
from loramoe.generation import generate, stop_token_ids
from loramoe.inference import eval_mode
from loramoe.reference import loramoe_delta_loop
from loramoe.serialization import adapter_tensors, load_adapter
from loramoe.suites.base import Example
from loramoe.targets import DEFAULT_TARGETS
from loramoe.train import train
from tests.conftest import random_batch, typed_records
from tests.families import FAMILIES, build, expected_paths, save

BATCH = random_batch(batch=2, seq=6)  # left padding on the first sample
REAL = BATCH["attention_mask"].bool()  # the positions whose logits mean something
PROMPT = Example(id="p", prompt="w5 w6 w7")
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Callable[[str], str]:
    """A family's model folder, saved once for the module on first use."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            save(name, path)
            made[name] = str(path)
        return made[name]

    return get


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> str:
    file = tmp_path_factory.mktemp("data") / "train.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in typed_records(4)))
    return str(file)


class TrainedState(TrainerCallback):
    """What the trained model holds and computes when training ends, just before the run saves it:
    its adapter tensors, and its logits on BATCH."""

    tensors: dict[str, Tensor]
    logits: Tensor

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.tensors = {key: value.clone() for key, value in adapter_tensors(model).items()}
        with eval_mode(model), torch.no_grad():
            self.logits = model(**BATCH).logits


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _generates_greedily(model, tokenizer) -> None:
    """loramoe's generate (with the KV cache) answers the same twice, and the same as greedy
    decoding by whole forwards without a cache."""
    answers = [generate(model, tokenizer, [PROMPT], style="completion", max_new_tokens=NEW_TOKENS,
                        stop_on_newline=False, progress=False)[0] for _ in range(2)]
    assert answers[0] == answers[1]
    ids = tokenizer(PROMPT.prompt, return_tensors="pt")["input_ids"]
    prompt_length, stop_ids = ids.shape[1], stop_token_ids(model, tokenizer)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            next_id = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            if next_id in stop_ids:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    assert answers[0] == tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True).strip()


def _loop_forward(layer: LoraMoELinear) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        return layer.base_layer(x) + loramoe_delta_loop(x, layer.router.weight, layer.lora_A, layer.lora_B,
                                                        layer.scale)
    return forward


def _fused_equals_the_loop(model) -> None:
    """The model's logits with its LoRAMoE layers fused, on the generation path (no autograd) and on
    the training path (the autograd op), equal those with every layer running the paper's loop."""
    layers = [layer for _, layer in adapter_layers(model)]
    torch.manual_seed(5)
    for layer in layers:  # experts well away from zero, so that they weigh in the logits
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    with torch.no_grad():
        generation_path = model(**BATCH).logits
    training_path = model(**BATCH).logits.detach()
    for layer in layers:
        layer.forward = _loop_forward(layer)
    with torch.no_grad():
        loop = model(**BATCH).logits
    assert (generation_path - loop)[REAL].abs().max() <= 1e-5
    assert (training_path - loop)[REAL].abs().max() <= 1e-5


@pytest.mark.parametrize("kind", list(LAYER_CLASSES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_training_step_saves_an_adapter_that_loads_equal_and_generates(family, kind, folder, records,
                                                                           tmp_path, one_thread):
    spec, trained = FAMILIES[family], TrainedState()
    train(data=[records], model=folder(family), method=kind, output=tmp_path, rank=2,
          target_modules=spec.target_modules, max_steps=1, batch_size=2, max_length=32, lr=1e-2,
          warmup_ratio=0.0, precision="fp32", logging_steps=1, callbacks=[trained])

    model, tokenizer = models.load(folder(family))
    # the records' words survive the family's tokenizer, so the step trained on them
    assert tokenizer.decode(tokenizer(PROMPT.prompt)["input_ids"]).strip() == PROMPT.prompt
    load_adapter(model, tmp_path)
    paths = [path for path, _ in adapter_layers(model)]
    assert paths == expected_paths(family)
    if spec.target_modules is None:  # the defaults: every target a feed-forward projection of the table
        defaults = DEFAULT_TARGETS[model.config.model_type]
        assert all(any(_matches(path, name) for name in defaults) for path in paths)
    loaded = adapter_tensors(model)
    assert loaded.keys() == trained.tensors.keys()
    assert all(torch.equal(loaded[key], trained.tensors[key]) for key in loaded)

    with torch.no_grad():
        logits = model(**BATCH).logits
        with disabled_adapters(model):
            base = model(**BATCH).logits
    assert (logits - trained.logits)[REAL].abs().max() <= 1e-5
    assert (logits - base)[REAL].abs().max() > 1e-4  # the step moved the adapter off the base model

    _generates_greedily(model, tokenizer)
    if kind == LoraMoEConfig.method:
        _fused_equals_the_loop(model)


@pytest.mark.parametrize("kind", list(LAYER_CLASSES))
def test_a_family_without_linear_feed_forward_layers_asks_for_target_modules(kind):
    for name in (name for name, spec in FAMILIES.items() if spec.target_modules is not None):
        model = build(name)
        with pytest.raises(TargetError) as error:
            loramoe.attach(model, LAYER_CLASSES[kind].config_class())
        message = str(error.value)
        assert f"model type '{model.config.model_type}'" in message and "3D tensors" in message
        assert "Pass target_modules" in message and "self_attn.q_proj" in message
        assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


def test_the_matrix_covers_the_families_it_names():
    covered = {spec.config_class.model_type for spec in FAMILIES.values() if spec.target_modules is None}
    assert covered <= set(DEFAULT_TARGETS)
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "phi", "gpt2", "gpt_neox", "falcon",
            "bloom", "gptj", "opt", "qwen2_moe"} <= covered
