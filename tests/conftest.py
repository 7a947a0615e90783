"""Tiny randomly initialised models built in code: never a download."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a Python child process that must run the code under test: this tree's
    src/ first, then the tree itself (for ``tests``). Without src/ the child imports the editable
    install's loramoe, which is the checkout the venv was installed from, not a worktree's, so a
    branch's test would compare its own code against that checkout's without a word."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]), **extra)


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from threads, and on a busy machine they cost tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(BUILDERS))
def tiny_model(request):
    return BUILDERS[request.param]()


def random_batch(batch: int = 3, seq: int = 7, vocab: int = 97, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :2] = 0  # left padding on the first sample
    return {"input_ids": ids, "attention_mask": mask}


def tiny_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words w0..w95 (id = number) and [UNK] (96); w1 is EOS."""
    vocab = {f"w{i}": i for i in range(96)}
    vocab["[UNK]"] = 96
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="w1", pad_token="w0")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny(folder, builder=tiny_llama):
    """A tiny model and its tokenizer saved as a local model folder, as a hub download would be."""
    model = builder()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def typed_records(n: int = 16) -> list[dict]:
    """Two sample types over the tiny tokenizer's words: knowledge answers from w10-w29, tasks
    from w50-w69, so the two types need different updates."""
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append({"instruction": f"w{2 + i % 7} w{3 + i % 5}", "output": f"w{10 + i % 20} w{11 + i % 19}",
                        "type": "knowledge"})
        else:
            out.append({"instruction": f"w{30 + i % 7} w{31 + i % 5}", "output": f"w{50 + i % 20} w{51 + i % 19}",
                        "type": "task"})
    return out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny(folder)
    return str(folder)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    file = tmp_path_factory.mktemp("data") / "train.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in typed_records()))
    return str(file)
