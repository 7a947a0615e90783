"""Malformed adapter configs and paper checkpoints are refused with one line naming the file and
the field or key (issue 23): a dtype the layers cannot train, JSON nested past Python's recursion
limit, keys that are not strings and NaN weights, and ``convert`` writes nothing before it refuses."""

from __future__ import annotations

import json

import pytest
import torch

import loramoe
from loramoe import AdapterLoadError, LoraConfig, LoraMoEConfig
from loramoe.cli import main as cli_main
from loramoe.convert import convert_paper_adapter
from loramoe.errors import UsageError
from loramoe.serialization import CONFIG_NAME, read_adapter_config
from tests.conftest import tiny_llama
from tests.test_convert import LAYER0, paper_config, paper_state, write_paper_folder
from tests.test_serialization import _edit_config

DEEP = "[" * 200_000 + "]" * 200_000
DTYPES = "must be one of float32, bfloat16, float16, float64"


def _cli_error(capsys, argv: list[str]) -> str:
    """The command's error, checked to be one line ``loramoe: error: ...`` with exit code 1 (after
    transformers' progress bars, for a command that loads a model)."""
    with pytest.raises(SystemExit) as stop:
        cli_main(argv)
    err = capsys.readouterr().err
    last = err.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    assert stop.value.code == 1 and last.startswith("loramoe: error: ") and "Traceback" not in err, err
    return last


@pytest.fixture
def saved_adapter(tmp_path):
    loramoe.save_adapter(loramoe.attach(tiny_llama(), LoraMoEConfig(num_experts=2, r=2)), tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("dtype", ["int8", "bool", "complex64", "float8_e4m3fn", "float99", "Tensor", "__all__"])
def test_an_adapter_dtype_the_layers_cannot_train_is_a_field_error(saved_adapter, dtype):
    _edit_config(saved_adapter, lambda d: d["config"].update(dtype=dtype))
    with pytest.raises(AdapterLoadError, match=rf"{CONFIG_NAME}: field 'config.dtype': {DTYPES}, got '{dtype}'"):
        loramoe.load_adapter(tiny_llama(), saved_adapter)
    with pytest.raises(UsageError, match=rf"^dtype {DTYPES}, got '{dtype}'"):
        LoraConfig(dtype=dtype)


def test_the_float_dtypes_and_their_aliases_still_load(saved_adapter):
    for dtype, want in [("bfloat16", torch.bfloat16), ("float64", torch.float64), ("half", torch.float16)]:
        _edit_config(saved_adapter, lambda d, dtype=dtype: d["config"].update(dtype=dtype))
        model = loramoe.load_adapter(tiny_llama(), saved_adapter)
        assert model.model.layers[0].mlp.up_proj.lora_A.dtype == want


@pytest.mark.parametrize("command", [["generate", "--prompt", "Hello"], ["eval", "--suite", "lm-loss"]])
def test_an_int8_adapter_is_one_line_from_the_command_before_the_model_loads(saved_adapter, tiny_model_dir, capsys,
                                                                              monkeypatch, tmp_path, command):
    _edit_config(saved_adapter, lambda d: d["config"].update(dtype="int8"))
    monkeypatch.setattr(loramoe.models, "load", lambda *a, **k: pytest.fail("the model loaded first"))
    err = _cli_error(capsys, [*command, "--model", str(tiny_model_dir), "--adapter", str(saved_adapter),
                              *(["--output", str(tmp_path / "eval")] if command[0] == "eval" else [])])
    assert f"{CONFIG_NAME}: field 'config.dtype': {DTYPES}, got 'int8'" in err


@pytest.mark.parametrize("text", [DEEP, '{"a": ' * 200_000 + "1" + "}" * 200_000])
def test_an_adapter_config_nested_too_deeply_names_the_file(saved_adapter, text):
    (saved_adapter / CONFIG_NAME).write_text(text)
    message = rf"adapter/{CONFIG_NAME}: invalid JSON: nested too deeply"
    with pytest.raises(AdapterLoadError, match=message):
        read_adapter_config(saved_adapter)
    with pytest.raises(AdapterLoadError, match=message):
        loramoe.load_adapter(tiny_llama(), saved_adapter)


def test_an_integer_longer_than_python_converts_names_the_file(saved_adapter):
    (saved_adapter / CONFIG_NAME).write_text('{"method": "lora", "config": {"r": ' + "1" * 5000 + "}}")
    with pytest.raises(AdapterLoadError, match=rf"{CONFIG_NAME}: invalid JSON: Exceeds the limit \(4300 digits\)"):
        read_adapter_config(saved_adapter)


def _with(key, value):
    return lambda state: state.__setitem__(key, value)


def _poison(key, value):
    def edit(state):
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
    return edit


BAD_WEIGHTS = {
    "int key": ("bin", lambda s: s.update({1: torch.zeros(2)}),
                r"adapter_model.bin: key 1 \(int\) is not a string"),
    "only an int key": ("bin", lambda s: (s.clear(), s.update({1: torch.zeros(2)})),
                        r"adapter_model.bin: key 1 \(int\) is not a string"),
    "tuple key": ("bin", lambda s: s.update({("a", 1): torch.zeros(2)}),
                  r"key \('a', 1\) \(tuple\) is not a string"),
    "NaN": ("bin", _poison(f"{LAYER0}A0.weight", float("nan")),
            rf"adapter_model.bin: key '{LAYER0}A0.weight' holds 1 NaN or Inf values \(of 64\)"),
    "Inf in safetensors": ("safetensors", _poison(f"{LAYER0}route.weight", float("-inf")),
                           rf"adapter_model.safetensors: key '{LAYER0}route.weight' holds 1 NaN or Inf values"),
    "scalar router": ("bin", _with(f"{LAYER0}route.weight", torch.tensor(1.0)),
                      rf"key '{LAYER0}route.weight' has shape \[\], not a weight matrix's two dimensions"),
    "sparse expert": ("bin", lambda s: s.update({f"{LAYER0}A0.weight": s[f"{LAYER0}A0.weight"].to_sparse()}),
                      rf"key '{LAYER0}A0.weight' holds a torch.sparse_coo tensor, not a dense one"),
    "float8 beside float32": ("bin", lambda s: s.update({f"{LAYER0}A1.weight": s[f"{LAYER0}A1.weight"]
                                                         .to(torch.float8_e4m3fn)}),
                              (rf"keys '{LAYER0}A0.weight' and '{LAYER0}A1.weight' hold torch.float32 and "
                               "torch.float8_e4m3fn values: one module's experts must share a dtype")),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_convert_refuses_bad_weights_before_writing(tmp_path, case):
    fmt, corrupt, message = BAD_WEIGHTS[case]
    state = paper_state(tiny_llama())
    corrupt(state)
    src = write_paper_folder(tmp_path / "paper", state, fmt=fmt)
    with pytest.raises(AdapterLoadError, match=message):
        convert_paper_adapter(src, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_a_huge_lora_nums_is_refused_at_its_first_missing_expert(tmp_path):
    src = write_paper_folder(tmp_path / "paper", paper_state(tiny_llama()), paper_config(lora_nums=10**9))
    with pytest.raises(AdapterLoadError, match=r"lora_A4.weight' missing \(expert 4 of lora_nums = 1000000000"):
        convert_paper_adapter(src, tmp_path / "ours")


def test_convert_command_refuses_a_non_string_key_in_one_line(tmp_path, capsys):
    src = write_paper_folder(tmp_path / "paper", {1: torch.zeros(2)})
    err = _cli_error(capsys, ["convert", str(src), str(tmp_path / "ours")])
    assert "adapter_model.bin: key 1 (int) is not a string" in err
    assert not (tmp_path / "ours").exists()


def test_convert_command_refuses_nan_and_leaves_an_existing_folder_as_it_was(tmp_path, capsys):
    state = paper_state(tiny_llama())
    _poison(f"{LAYER0}B2.weight", float("nan"))(state)
    src = write_paper_folder(tmp_path / "paper", state)
    empty, new = tmp_path / "empty", tmp_path / "new"
    empty.mkdir()
    for dst in (empty, new):
        err = _cli_error(capsys, ["convert", str(src), str(dst)])
        assert f"adapter_model.bin: key '{LAYER0}B2.weight' holds 1 NaN or Inf values (of 96)" in err
    assert list(empty.iterdir()) == [] and not new.exists()


def test_convert_command_refuses_a_config_nested_too_deeply(tmp_path, capsys):
    src = write_paper_folder(tmp_path / "paper", paper_state(tiny_llama()), paper_config())
    (src / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"})[:-1] + ', "x": ' + DEEP + "}")
    err = _cli_error(capsys, ["convert", str(src), str(tmp_path / "ours")])
    assert f"paper/{CONFIG_NAME}: invalid JSON: nested too deeply" in err
    assert not (tmp_path / "ours").exists()
