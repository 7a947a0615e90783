"""Quantized base models (QLoRA-style): bitsandbytes 4-bit NF4 or 8-bit linear layers, frozen, under
adapters whose own weights stay floating point.

bitsandbytes is an optional extra (``pip install 'loramoe[quant]'``). Nothing here imports it
unless a model is loaded quantized: a layer can only be a bitsandbytes layer once bitsandbytes is
imported, so :func:`is_quantized` looks in ``sys.modules`` instead.

The adapter kinds treat a quantized layer as a frozen ``nn.Linear`` (which bitsandbytes' layers
subclass, with the true ``in_features``/``out_features``) whose product only its own ``forward``
can compute: they call it and add their update. Its weight is packed integers, so an adapter
cannot be merged into it (``merge`` raises MergeError).
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import torch
from torch import Tensor, nn

from loramoe.errors import MissingPackageError, UsageError

KINDS = ("4bit", "8bit")
"""What ``quantize`` accepts (None: no quantization)."""

class _Int8CastNotice(logging.Filter):
    """Drops the warning bitsandbytes' 8-bit matmul logs at every call of every layer given a float32
    or bfloat16 input: that it quantizes the input through float16, which is how LLM.int8() works."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def require_bitsandbytes(kind: str | None) -> None:
    """Refuse an unknown ``quantize`` value, or a quantized load without bitsandbytes installed."""
    if kind is None:
        return
    if kind not in KINDS:
        raise UsageError(f"quantize must be one of {', '.join(KINDS)} or None, got {kind!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingPackageError(f"quantize={kind!r} needs bitsandbytes, an optional extra: "
                                  "pip install 'loramoe[quant]' (or pip install 'bitsandbytes>=0.50')")
    logger = logging.getLogger("bitsandbytes.autograd._functions")  # the module's own, created now if need be
    if not any(isinstance(f, _Int8CastNotice) for f in logger.filters):
        logger.addFilter(_Int8CastNotice())


def quantization_config(kind: str, compute_dtype: torch.dtype | None):
    """transformers' ``BitsAndBytesConfig`` for ``kind``: NF4 4-bit weights dequantized to
    ``compute_dtype`` for each matmul, or LLM.int8() 8-bit weights. Modules left unquantized are
    transformers' default: the output embeddings (lm_head), tied weights, the last module."""
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantized_types() -> tuple[type[nn.Module], ...]:
    bnb = sys.modules.get("bitsandbytes")
    return () if bnb is None else (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes 4-bit or 8-bit linear layer."""
    types = quantized_types()
    return bool(types) and isinstance(layer, types)


def keep_gradients_on_cpu(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights. On a CPU with AVX512-BF16, the first
    call of a 4-bit layer in eval mode on an input that needs no gradient repacks its weight for a
    bf16 kernel, and every later call, in training too, takes that kernel, which has no backward:
    gradients stop at the layer without an error (bitsandbytes 0.50). A model that validates or
    generates between training steps must keep them, and compute the same in eval and train mode."""
    bnb = sys.modules.get("bitsandbytes")
    for module in model.modules() if bnb is not None else ():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The floating dtype a quantized layer computes in: a 4-bit layer's compute dtype (else the
    dtype it was quantized from); float32 for an 8-bit one, which keeps neither."""
    if getattr(layer, "compute_dtype", None) is not None:
        return layer.compute_dtype
    state = getattr(layer.weight, "quant_state", None)
    return state.dtype if state is not None else torch.float32


def dense_weight(layer: nn.Module) -> Tensor:
    """A quantized layer's weight dequantized to float, (d_out, d_in): what its matmul multiplies by."""
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    # an 8-bit layer moves its row scales from the weight to its matmul state at the first call
    scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)
