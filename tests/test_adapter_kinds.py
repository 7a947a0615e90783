"""An adapter kind is one module plus one entry in ``LAYER_CLASSES``: attaching, saving, loading
and ``loramoe train --method`` take every kind from the table, with no per-kind branch elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, get_args

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import loramoe
from loramoe.adapters import LAYER_CLASSES, AdapterConfig, AdapterLayer
from loramoe.attach import adapter_layers
from loramoe.serialization import WEIGHTS_NAME
from loramoe.train.main import Method
from tests.conftest import random_batch, tiny_llama


@dataclass
class ShiftConfig(AdapterConfig):
    """A kind made up for the test: a trained shift of each target's output."""

    method: ClassVar[str] = "shift"


class ShiftLinear(AdapterLayer):
    config_class = ShiftConfig

    def __init__(self, base_layer: nn.Module, config: ShiftConfig) -> None:
        super().__init__(base_layer)
        self.shift = nn.Parameter(torch.zeros(self.out_features, dtype=self.parameter_dtype(base_layer, config)))

    def adapter_delta(self, x: Tensor) -> Tensor:
        return self.shift.expand(*x.shape[:-1], -1)

    @classmethod
    def parameter_shapes(cls, d_in: int, d_out: int, config: ShiftConfig) -> dict[str, tuple[int, ...]]:
        return {"shift": (d_out,)}


def test_a_new_kind_in_the_table_attaches_saves_and_loads(monkeypatch, tmp_path):
    monkeypatch.setitem(LAYER_CLASSES, ShiftConfig.method, ShiftLinear)
    model = loramoe.attach(tiny_llama(), ShiftConfig())
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.shift.normal_()
    loramoe.save_adapter(model, tmp_path)
    assert set(load_file(tmp_path / WEIGHTS_NAME)) == {f"{path}.shift" for path, _ in adapter_layers(model)}
    loaded = loramoe.load_adapter(tiny_llama(), tmp_path)
    batch = random_batch()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
        assert not torch.equal(loaded(**batch).logits, tiny_llama()(**batch).logits)


def test_train_methods_are_the_table_and_full_fine_tuning():
    assert get_args(Method) == (*LAYER_CLASSES, "full")
