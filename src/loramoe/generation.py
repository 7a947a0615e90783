"""Batched greedy decoding of benchmark answers.

Greedy decoding keeps an evaluation deterministic, and a model's answer is its first line: small
models answer a question and then carry on with a new one, so generation stops at the first
newline of the answer (or at EOS, or after ``max_new_tokens``), and whatever came after a newline
is cut off anyway. Byte-level tokenizers merge newlines with other whitespace (SmolLM2 has 129
tokens holding one, ``ĊĊ`` and ``ĊĠĠ`` among them), so the newline stop reads the decoded text
rather than comparing token ids. A newline before any visible text does not stop generation: some
models open their answer with one, and the answer is what follows it.

Prompts come in two styles, chosen per benchmark, since small models answer very differently in
each: ``chat`` renders the request as a user turn exactly as training renders prompts
(``loramoe.data.encode_prompt``); ``completion`` tokenizes a text to continue (``Example.completion``,
else the prompt) with the special tokens the tokenizer adds on its own (BOS for Llama-like ones).

Batches hold prompts of similar lengths (longest first, so running out of memory shows at once):
at most ``batch_size`` prompts and at most ``batch_size`` times the mean prompt length in padded
tokens, so that a few long prompts do not pad a batch of short ones to their length (prefill is
most of the cost on a CPU). They are left-padded with an attention mask; Hugging Face
``generate`` derives the positions from that mask, so a prompt gets the same tokens whichever
batch it sits in (tested in float32; in half precision the padding can flip a near-tie). The
model runs in eval mode (its mode is restored afterwards); the tokenizer is never modified, its
``padding_side`` included.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from loramoe.data import encode_prompt
from loramoe.errors import UsageError
from loramoe.inference import eval_mode
from loramoe.suites.base import Example, PromptStyle


def prompt_ids(example: Example, tokenizer: PreTrainedTokenizerBase, style: PromptStyle) -> list[int]:
    """The token ids generation starts from, in the given prompt style."""
    if style == "chat":
        ids = encode_prompt([{"role": "user", "content": example.prompt}], tokenizer)
    elif style == "completion":
        ids = tokenizer(example.completion if example.completion is not None else example.prompt)["input_ids"]
    else:
        raise UsageError(f"unknown prompt style '{style}'; use 'completion' or 'chat'")
    if not ids:
        raise UsageError(f"example '{example.id}': its {style} prompt is empty after tokenization")
    return list(ids)


class _NewlineStop(StoppingCriteria):
    """Marks a row done once its generated text holds a newline after some visible text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor(["\n" in text.lstrip() for text in texts], dtype=torch.bool, device=input_ids.device)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models often end a turn
    with a token the tokenizer does not call EOS)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids.update([configured] if isinstance(configured, int) else configured or [])
    return sorted(ids)


def answer_end(new_ids: Sequence[int], stop_ids: Collection[int]) -> int:
    """How many generated ids are the answer: those before the first stop token."""
    return next((i for i, token in enumerate(new_ids) if token in stop_ids), len(new_ids))


def _answer(new_ids: list[int], stop_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase,
            stop_on_newline: bool) -> str:
    """The answer in the generated ids: up to the first EOS (and first line), stripped."""
    text = tokenizer.decode(new_ids[:answer_end(new_ids, stop_ids)], skip_special_tokens=True).strip()
    return text.split("\n", 1)[0].strip() if stop_on_newline else text


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded (rows, longest) id tensor and its attention mask, on ``device``."""
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row):] = 1
    return ids.to(device), mask.to(device)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest prompts first (see the module docstring)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = batch_size * sum(lengths) / max(len(lengths), 1)
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *,
             style: PromptStyle | Sequence[PromptStyle], max_new_tokens: int = 32, batch_size: int = 16,
             stop_on_newline: bool = True, progress: bool = True) -> list[str]:
    """Each example's greedy answer, in the order of ``examples``. ``style`` is one prompt style
    for all, or one per example: several benchmarks' prompts then share batches, and a batch of
    32 costs about what a batch of 4 does on a CPU. See the module docstring."""
    if max_new_tokens < 1 or batch_size < 1:
        raise UsageError(f"max_new_tokens and batch_size must be at least 1, "
                         f"got {max_new_tokens} and {batch_size}")
    styles = [style] * len(examples) if isinstance(style, str) else list(style)
    if len(styles) != len(examples):
        raise UsageError(f"{len(styles)} prompt styles for {len(examples)} examples")
    prompts = [prompt_ids(example, tokenizer, s) for example, s in zip(examples, styles)]
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # its value never matters: padding is masked, and answers end before any filler
        if not stop_ids:
            raise UsageError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        pad_id = stop_ids[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, eos_token_id=stop_ids or None, pad_token_id=pad_id)
    answers: list[str] = [""] * len(prompts)
    with eval_mode(model):
        for chunk in tqdm(_batches([len(p) for p in prompts], batch_size), desc="generating", unit="batch",
                          disable=not progress):
            ids, mask = left_pad([prompts[i] for i in chunk], pad_id, model.device)
            stopping = StoppingCriteriaList([_NewlineStop(tokenizer, ids.shape[1])] if stop_on_newline else [])
            with torch.no_grad():
                output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                        stopping_criteria=stopping)
            for i, row in zip(chunk, output[:, ids.shape[1]:].tolist()):
                answers[i] = _answer(row, stop_ids, tokenizer, stop_on_newline)
    return answers
