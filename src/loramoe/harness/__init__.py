"""The lm-evaluation-harness model ``loramoe``: any base model ``loramoe.models.load`` takes, with
any adapter folder ``load_adapter`` takes (LoRA, Tied LoRA, LoRAMoE, a converted paper checkpoint).

After ``import loramoe.harness``::

    lm_eval.simple_evaluate(model="loramoe", model_args="pretrained=smollm2-135m,adapter=runs/mine",
                            tasks=["arc_easy"])

or, from the shell, ``python -m loramoe.harness`` with lm-eval's own flags (``--model loramoe``).
The model is built here and handed to lm-eval's ``HFLM`` as a loaded model, so batching, ``limit``,
few-shot prompts, ``log_samples`` and every metric are lm-eval's own. Needs the ``loramoe[harness]``
extra. ``model_args``: ``pretrained`` (an embedded model name, a local folder or a hub id),
``adapter`` (a folder), ``dtype`` (float32 by default, as ``loramoe eval`` scores; ``bfloat16``,
``float16`` or ``auto``), ``quantize`` (``4bit``/``8bit``), ``trust_remote_code``, ``device``, and
those of lm-eval's ``hf`` model that act on a loaded model (``max_length``, ``add_bos_token``,
``softmax_dtype``...).
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramoe import models
from loramoe.attach import adapter_config, disabled_adapters
from loramoe.errors import MissingFileError, MissingPackageError, UsageError
from loramoe.serialization import load_adapter, read_adapter_config

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:
    raise MissingPackageError("loramoe.harness needs lm-eval: pip install 'loramoe[harness]'") from e

__all__ = ["LoramoeLM"]

DTYPES = ("float32", "bfloat16", "float16", "auto")

# HFLM options that only act while HFLM builds the model from a name: given a loaded model it
# drops them without a word, so an adapter meant for `peft=` would be silently left out
_BUILD_OPTIONS = {"backend", "revision", "subfolder", "tokenizer", "use_fast_tokenizer", "parallelize",
                  "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "tp_plan", "peft", "delta", "autogptq",
                  "gptqmodel", "gguf_file"}
_OWN = {"pretrained", "dtype", "trust_remote_code", "device"}
_PASSED_ON = sorted(set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"} - _BUILD_OPTIONS - _OWN)


def _adapter_folder(adapter: str) -> Path:
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"adapter={adapter}: no such folder (an adapter folder holds adapter_config.json "
                               "and adapter_model.safetensors)")
    read_adapter_config(folder)  # a bad config is refused before the model loads, not after
    return folder


def _check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(_PASSED_ON))
    if unknown:
        hint = " (load a PEFT LoRA folder with adapter=)" if "peft" in unknown else ""
        raise UsageError(f"model_args {', '.join(unknown)}: not an option of the loramoe model{hint}; it takes "
                         f"pretrained, adapter, dtype, quantize, trust_remote_code, device and {', '.join(_PASSED_ON)}")


@register_model("loramoe")
class LoramoeLM(HFLM):
    """lm-eval's ``hf`` model on a base model loaded by :func:`loramoe.models.load` with ``adapter``
    (a saved adapter folder) attached; ``options`` go to ``HFLM`` (batch size, ``max_length``...)."""

    def __init__(self, pretrained: str, adapter: str | None = None, *, dtype: str | torch.dtype | None = None,
                 quantize: str | None = None, trust_remote_code: bool = False, device: str | torch.device | None = None,
                 **options: Any) -> None:
        if not isinstance(pretrained, str):
            raise UsageError(f"pretrained: a model name, folder or hub id, not a {type(pretrained).__name__}; "
                             "to score a loaded model, give it to lm-eval's HFLM")
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise UsageError(f"model_args dtype={dtype}: not one of {', '.join(DTYPES)}")
        _check_options(options)
        folder = _adapter_folder(str(adapter)) if adapter is not None else None
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda:0 unless told otherwise; its hf model, given a device
            # this machine lacks, likewise runs where it can
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = models.load(pretrained, dtype=dtype, device=str(device),
                                       trust_remote_code=trust_remote_code, quantize=quantize)
        if folder is not None:
            load_adapter(model, folder)
        super().__init__(pretrained=model, tokenizer=tokenizer, trust_remote_code=trust_remote_code, **options)
        self.pretrained = pretrained  # HFLM left the model object here, where its info looks for the hub id
        self.adapter = str(folder) if folder is not None else None

    def without_adapter(self) -> AbstractContextManager[nn.Module]:
        """Inside the block the same loaded model scores as its base, the adapter switched off: a
        run with and without the adapter, paired by document, from one load."""
        return disabled_adapters(self.model)

    def get_model_info(self) -> dict[str, Any]:
        config = adapter_config(self.model)
        adapter = {"adapter": self.adapter, "adapter_method": config.method if config is not None else None}
        if self.pretrained in models.EMBEDDED or Path(self.pretrained).expanduser().is_dir():
            # HFLM's info asks the hub for the model's commit: a local model has none, and asking
            # where the hub cannot be reached waits out a timeout
            return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype),
                    **adapter}
        return {**super().get_model_info(), **adapter}
