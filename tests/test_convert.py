"""Importing the LoRAMoE paper's adapter folders (github.com/Ablustrund/LoRAMoE): its layout is
written here from random values, its layer computed by a plain loop, and the converted folder must
load onto a fresh model with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from loramoe import load_adapter
from loramoe.cli import main as cli_main
from loramoe.convert import convert_paper_adapter, paper_groups
from loramoe.errors import OutputFolderError, UsageError
from loramoe.serialization import AdapterLoadError, read_adapter_config
from tests.conftest import random_batch, tiny_llama

EXPERTS, RANK, ALPHA = 4, 2, 8.0
TARGETS = ("gate_proj", "up_proj", "down_proj")  # the paper's run_loramoe.sh
PREFIX = "base_model.model."


def paper_state(model: torch.nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """The paper's keys for every MLP projection of ``model``, with random values (B nonzero, so the
    adapter changes the logits)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in TARGETS:
            key = f"{PREFIX}{path}.lora_"
            state[f"{key}route.weight"] = torch.randn(EXPERTS, module.in_features, generator=g)
            for i in range(EXPERTS):
                state[f"{key}A{i}.weight"] = torch.randn(RANK, module.in_features, generator=g) * 0.3
                state[f"{key}B{i}.weight"] = torch.randn(module.out_features, RANK, generator=g) * 0.3
    return state


def paper_config(**changes) -> dict:
    """adapter_config.json as the paper's PEFT writes it (its LoraConfig's __dict__, sorted keys)."""
    config = {"base_model_name_or_path": "llama2-7b", "bias": "none", "blc_alpha": 0.1, "blc_weight": 0.01,
              "enable_lora": None, "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": ALPHA,
              "lora_dropout": 0.05, "lora_nums": EXPERTS, "merge_weights": False, "modules_to_save": None,
              "peft_type": "LORA", "r": RANK, "target_modules": list(TARGETS), "task_type": "CAUSAL_LM"}
    return {**config, **changes}


def write_paper_folder(folder, state, config=None, fmt="bin"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config or paper_config(), indent=2, sort_keys=True))
    if fmt == "bin":
        torch.save(state, folder / "adapter_model.bin")
    else:
        save_file(state, folder / "adapter_model.safetensors")
    return folder


def paper_logits(model: torch.nn.Module, state: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
    """The paper's layer, one expert at a time, in eval mode: base(x) + sum_i softmax(route(x))_i
    * B_i(A_i(x)) * lora_alpha / r, with the softmax in float32."""
    def hook(path):
        def add_experts(module, inputs, out):
            x, key = inputs[0], f"{PREFIX}{path}.lora_"
            gates = torch.softmax(x @ state[f"{key}route.weight"].T, dim=-1, dtype=torch.float32).to(out.dtype)
            for i in range(EXPERTS):
                expert = x @ state[f"{key}A{i}.weight"].T @ state[f"{key}B{i}.weight"].T
                out = out + gates[..., i : i + 1] * expert * (ALPHA / RANK)
            return out
        return add_experts

    handles = [module.register_forward_hook(hook(path)) for path, module in model.named_modules()
               if path.rsplit(".", 1)[-1] in TARGETS]
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_a_converted_paper_adapter_gives_the_papers_logits(tmp_path, fmt, one_thread):
    model, batch = tiny_llama(), random_batch()
    state = paper_state(model)
    want = paper_logits(model, state, batch)
    with torch.no_grad():
        change = (want - model(**batch).logits).abs().max().item()
    assert change > 0.1  # the experts do change the logits
    out = convert_paper_adapter(write_paper_folder(tmp_path / "paper", state, fmt=fmt), tmp_path / "ours")
    config, paths = read_adapter_config(out)
    assert (config.num_experts, config.r, config.alpha, config.dropout) == (EXPERTS, RANK, ALPHA, 0.05)
    assert (config.balance_delta, config.balance_weight) == (0.1, 0.01)
    assert config.groups == {"knowledge": 2, "task": 2}  # task_type 1 -> the first half
    assert paths == [f"model.layers.{n}.mlp.{name}" for n in (0, 1) for name in sorted(TARGETS)]
    loaded = load_adapter(tiny_llama(), out).eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    diff = (got - want).abs().max().item()
    print(f"max logit difference ({fmt}): {diff:.3g}, the experts' change {change:.3g}")
    # The experts swell the residual stream to ~90 before the final norm brings the logits to ~0.5, so
    # fp32 rounding in another order (fused group vs loop) is a few ulps of ~90 (7.6e-6), up to 1.4e-5 on
    # the logits with ATen's default (non-AVX) kernels: bounded relative to what the adapter changes,
    # which a conversion error (a swapped group, A/B or scale) moves by order 1.
    assert diff < 1e-3 * change


def test_groups_default_to_the_papers_halves_and_can_be_given(tmp_path):
    assert paper_groups(8) == {"knowledge": 4, "task": 4}
    assert paper_groups(3) is None and paper_groups(1) is None  # no halves: one pool
    src = write_paper_folder(tmp_path / "paper", paper_state(tiny_llama()))
    out = convert_paper_adapter(src, tmp_path / "ours", groups={"knowledge": 1, "task": 3})
    assert read_adapter_config(out)[0].groups == {"knowledge": 1, "task": 3}
    with pytest.raises(UsageError, match="hold 3 experts; .* has lora_nums = 4"):
        convert_paper_adapter(src, tmp_path / "other", groups={"knowledge": 1, "task": 2})
    with pytest.raises(UsageError, match="groups must map each sample type to a positive expert count"):
        convert_paper_adapter(src, tmp_path / "other", groups={"knowledge": 0, "task": 4})


def _drop(key):
    return lambda state: state.pop(key)


def _reshape(key, shape):
    return lambda state: state.__setitem__(key, torch.zeros(shape))


LAYER0 = f"{PREFIX}model.layers.0.mlp.gate_proj.lora_"
CORRUPT = {
    "missing expert": (_drop(f"{LAYER0}B3.weight"),
                       rf"adapter_model.bin: key '{LAYER0}B3.weight' missing \(expert 3 of lora_nums = 4"),
    "missing router": (_drop(f"{LAYER0}route.weight"), rf"key '{LAYER0}route.weight' missing \(the router"),
    "extra expert": (lambda s: s.__setitem__(f"{LAYER0}A4.weight", torch.zeros(RANK, 32)),
                     rf"key '{LAYER0}A4.weight': expert 4, but lora_nums is 4"),
    "wrong rank": (_reshape(f"{LAYER0}A1.weight", (RANK + 1, 32)),
                   rf"key '{LAYER0}A1.weight' has shape \[3, 32\], expected \[2, 32\]"),
    "wrong d_out": (_reshape(f"{LAYER0}B2.weight", (47, RANK)),
                    rf"key '{LAYER0}B2.weight' has shape \[47, 2\], expected \[48, 2\]"),
    "router rows": (_reshape(f"{LAYER0}route.weight", (3, 32)),
                    rf"key '{LAYER0}route.weight' has shape \[3, 32\], expected \[4, 32\]"),
    "unknown key": (lambda s: s.__setitem__(f"{PREFIX}model.layers.0.mlp.gate_proj.bias", torch.zeros(48)),
                    r"unknown key 'base_model.model.model.layers.0.mlp.gate_proj.bias'"),
    "integer tensor": (lambda s: s.__setitem__(f"{LAYER0}A0.weight", torch.zeros(RANK, 32, dtype=torch.long)),
                       rf"key '{LAYER0}A0.weight' holds torch.int64 values"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_bad_weights_name_the_file_and_key(tmp_path, case):
    corrupt, message = CORRUPT[case]
    state = paper_state(tiny_llama())
    corrupt(state)
    src = write_paper_folder(tmp_path / "paper", state)
    with pytest.raises(AdapterLoadError, match=message):
        convert_paper_adapter(src, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()  # nothing written before every check passed


class NotATensor:
    pass


def test_bad_folders_and_configs_are_named(tmp_path):
    state = paper_state(tiny_llama())
    cases = {
        "plain PEFT LoRA": (paper_config(lora_nums=None, blc_alpha=None, blc_weight=None),
                            r"field 'lora_nums': missing, so a plain PEFT LoRA.*load_adapter reads it"),
        "not LoRA": (paper_config(peft_type="PREFIX_TUNING"), r"field 'peft_type': 'PREFIX_TUNING'"),
        "string rank": (paper_config(r="2"), r"adapter_config.json: field 'r': must be of type int"),
        "delta of 1": (paper_config(blc_alpha=1.0), r"balance_delta must be in \[0, 1\), got 1.0.*blc_alpha as"),
    }
    for name, (config, message) in cases.items():
        src = write_paper_folder(tmp_path / name, state, config)
        with pytest.raises(AdapterLoadError, match=message):
            convert_paper_adapter(src, tmp_path / f"{name} out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterLoadError, match=r"empty/adapter_config.json: not found"):
        convert_paper_adapter(empty, tmp_path / "out")
    (empty / "adapter_config.json").write_text(json.dumps(paper_config()))
    with pytest.raises(AdapterLoadError, match=r"empty/adapter_model.bin: not found \(nor adapter_model.safetensors"):
        convert_paper_adapter(empty, tmp_path / "out")
    torch.save({f"{LAYER0}route.weight": NotATensor()}, empty / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match=r"adapter_model.bin: not a torch file of tensors only"):
        convert_paper_adapter(empty, tmp_path / "out")  # weights_only: no class of the file is run


def test_the_command_converts_into_a_new_folder_only(tmp_path, capsys):
    src = write_paper_folder(tmp_path / "paper", paper_state(tiny_llama()), fmt="safetensors")
    dst = tmp_path / "ours"
    cli_main(["convert", str(src), str(dst)])  # positional, as typed
    assert "4 experts of rank 2 on 6 projections" in capsys.readouterr().out
    load_adapter(tiny_llama(), dst)
    with pytest.raises(SystemExit):
        cli_main(["convert", "--src", str(src), "--dst", str(dst)])
    assert "ours: not empty" in capsys.readouterr().err
    with pytest.raises(OutputFolderError, match="not empty"):
        convert_paper_adapter(src, src)  # the source itself is never overwritten
