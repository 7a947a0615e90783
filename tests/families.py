"""One tiny random model per architecture family, built from transformers' config classes (never a
download), for the family matrix of tests/test_families.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OlmoeConfig,
    OPTConfig,
    Phi3Config,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen2Tokenizer,
    Qwen3Config,
)

from loramoe.targets import DEFAULT_TARGETS
from tests.conftest import tiny_tokenizer

TOKENS = {"vocab_size": 97, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
"""The tiny tokenizer's vocabulary (w0..w95 and [UNK]): w0 pads, w1 ends; every family's defaults
point elsewhere (GPT-2's 50256, Phi-3's 32000), outside a 97-word embedding."""

LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64}
PLAIN = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 64}
GPT_SIZES = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}
LAYERS = 2


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """The words w0..w95 in Qwen2's form: byte-level BPE over ``w``, ``Ġw`` and the digits (ids up to
    14); ``<|endoftext|>`` (1) ends, ``<|pad|>`` (0) pads. transformers 5 loads a qwen2 folder's
    tokenizer as a Qwen2Tokenizer whatever its files name (it counts qwen2 among the hub's mislabelled
    ones), keeping only a BPE's vocabulary and merges: the word-level tokenizer would encode nothing."""
    vocab = {"<|pad|>": 0, "<|endoftext|>": 1, "w": 2, "Ġ": 3, "Ġw": 4, **{str(d): 5 + d for d in range(10)}}
    return Qwen2Tokenizer(vocab=vocab, merges=[("Ġ", "w")], eos_token="<|endoftext|>", pad_token="<|pad|>")


@dataclass(frozen=True)
class Family:
    config_class: type[PretrainedConfig]
    sizes: dict[str, Any]
    layers: str = "model.layers"
    """Module path of the decoder layers, before the layer index."""
    per_layer: tuple[tuple[str, ...], ...] = ()
    """The names each layer's adapted modules end with, layer by layer; () for the family's
    DEFAULT_TARGETS in every layer."""
    target_modules: list[str] | None = None
    """What to pass where the defaults cannot work (attach raises a TargetError that says so)."""
    tokenizer: Callable[[], PreTrainedTokenizerBase] = tiny_tokenizer


_SHARED_EXPERT = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")

FAMILIES: dict[str, Family] = {
    "llama": Family(LlamaConfig, LLAMA_LIKE),
    "mistral": Family(MistralConfig, LLAMA_LIKE),
    "qwen2": Family(Qwen2Config, LLAMA_LIKE, tokenizer=qwen2_tokenizer),
    "qwen3": Family(Qwen3Config, {**LLAMA_LIKE, "head_dim": 8}),
    "gemma": Family(GemmaConfig, {**LLAMA_LIKE, "head_dim": 8}),
    # a window shorter than the test's sequences, so the sliding layers really slide
    "gemma2": Family(Gemma2Config, {**LLAMA_LIKE, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4}),
    "phi3": Family(Phi3Config, {**LLAMA_LIKE, "original_max_position_embeddings": 64}),
    "phi": Family(PhiConfig, PLAIN),
    "gpt2": Family(GPT2Config, GPT_SIZES, layers="transformer.h"),
    "gpt_neox": Family(GPTNeoXConfig, PLAIN, layers="gpt_neox.layers"),
    "falcon": Family(FalconConfig, {**PLAIN, "ffn_hidden_size": 48}, layers="transformer.h"),
    "bloom": Family(BloomConfig, {"hidden_size": 32, "n_layer": 2, "n_head": 4}, layers="transformer.h"),
    "gptj": Family(GPTJConfig, {**GPT_SIZES, "rotary_dim": 4, "n_inner": 48}, layers="transformer.h"),
    "opt": Family(OPTConfig, {**PLAIN, "ffn_dim": 48}, layers="model.decoder.layers"),
    # layer 0 a sparse MoE block (routed experts and a shared expert), layer 1 a dense MLP
    "qwen2_moe": Family(Qwen2MoeConfig, {**LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
                                         "mlp_only_layers": [1]},
                        per_layer=(_SHARED_EXPERT, tuple(DEFAULT_TARGETS["llama"]))),
    # every layer's FFN is routed experts stored as 3D tensors: no linear FFN to adapt
    "olmoe": Family(OlmoeConfig, {**LLAMA_LIKE, "intermediate_size": 16, "num_experts": 4,
                                  "num_experts_per_tok": 2},
                    per_layer=(_ATTENTION,) * LAYERS, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def build(name: str, seed: int = 0) -> PreTrainedModel:
    """The family's tiny model, randomly initialised from ``seed``, in eval mode."""
    family = FAMILIES[name]
    torch.manual_seed(seed)
    config = family.config_class(**TOKENS, **family.sizes)
    return AutoModelForCausalLM.from_config(config).eval()


def save(name: str, folder: Path) -> None:
    """The family's tiny model and tokenizer as a local model folder, as a download would be."""
    build(name).save_pretrained(folder)
    FAMILIES[name].tokenizer().save_pretrained(folder)


def expected_paths(name: str) -> list[str]:
    """The module paths an adapter on the family's model should wrap, in model order."""
    family = FAMILIES[name]
    model_type = family.config_class.model_type
    per_layer = family.per_layer or (tuple(DEFAULT_TARGETS[model_type]),) * LAYERS
    return [f"{family.layers}.{i}.{target}" for i, names in enumerate(per_layer) for target in names]
