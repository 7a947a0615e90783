"""The first thing to run: attach LoRAMoE to a model, train a few steps, save, reload, generate.

It touches every piece of the core on a real model: loading (the embedded SmolLM2-135M by
default), attaching, training with the Hugging Face ``Trainer``, the safetensors format, and
routing capture. The numbers it prints come from the run, and it checks its own round trip.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Trainer, TrainingArguments

from loramoe import models
from loramoe.adapters import LoraMoEConfig
from loramoe.attach import attach, disabled_adapters, trainable_parameters
from loramoe.routing import capture_routing
from loramoe.serialization import load_adapter, save_adapter

EXAMPLES: list[tuple[str, str]] = [
    ("Translate to French: good morning", "bonjour"),
    ("Translate to French: thank you very much", "merci beaucoup"),
    ("Translate to French: the red house", "la maison rouge"),
    ("Translate to French: see you tomorrow", "à demain"),
    ("Summarise in three words: The Nile is a major north-flowing river in northeastern Africa.",
     "African river Nile"),
    ("Summarise in three words: Mount Everest is Earth's highest mountain above sea level.",
     "Earth's highest mountain"),
    ("What is the capital of Portugal? Answer in one word.", "Lisbon"),
    ("What is the capital of Kenya? Answer in one word.", "Nairobi"),
]
"""A handful of built-in instruction examples (translation, summarisation, closed-book QA)."""

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""Prompt format for tokenizers without a chat template."""

PROMPTS = ["Translate to French: the green tree", "What is the capital of Peru? Answer in one word."]


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str | None = None) -> dict[str, list[int]]:
    """Token ids of a chat-formatted example; the loss (``labels``) covers the response only."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=True)["input_ids"])
    else:
        prompt_ids = tokenizer(PLAIN_TEMPLATE.format(prompt=prompt))["input_ids"]
    if response is None:
        return {"input_ids": prompt_ids, "attention_mask": [1] * len(prompt_ids)}
    response_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + response_ids, "attention_mask": [1] * (len(prompt_ids) + len(response_ids)),
            "labels": [-100] * len(prompt_ids) + response_ids}


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    tokenizer.padding_side = "left"
    batch = tokenizer.pad([_encode(tokenizer, p) for p in prompts], return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def run_demo(model: str = "smollm2-135m", steps: int = 10, lr: float = 1e-3, batch_size: int = 4,
             output: Path = Path("runs/demo"), max_new_tokens: int = 16, seed: int = 0) -> dict[str, Any]:
    """Attach LoRAMoE to a model, train a few steps on built-in examples, save, reload and generate.

    Args:
        model: embedded model name (``smollm2-135m``), local folder or Hugging Face hub id.
        steps: optimizer steps.
        lr: peak learning rate (cosine schedule with warmup).
        batch_size: examples per step.
        output: folder for the adapter (``output/adapter``).
        max_new_tokens: tokens generated per prompt.
        seed: random seed for initialisation and data order.
    """
    torch.manual_seed(seed)
    start = time.time()
    base, tokenizer = models.load(model)
    print(f"loaded {model} in {time.time() - start:.1f} s")
    attach(base, LoraMoEConfig())
    print(trainable_parameters(base))

    data = [_encode(tokenizer, p, r) for p, r in EXAMPLES]
    tokenizer.padding_side = "right"
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
                                 logging_steps=max(1, steps // 4), save_strategy="no", report_to=[], seed=seed,
                                 use_cpu=not torch.cuda.is_available(), disable_tqdm=False)
        trainer = Trainer(model=base, args=args, train_dataset=data,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    base.eval()

    adapter_dir = save_adapter(base, Path(output) / "adapter")
    reloaded, _ = models.load(model)
    load_adapter(reloaded, adapter_dir)
    probe = tokenizer.pad([_encode(tokenizer, p) for p in PROMPTS], return_tensors="pt")
    with torch.no_grad():
        drift = (base(**probe).logits - reloaded(**probe).logits).abs().max().item()
    if drift != 0.0:
        raise RuntimeError(f"reloaded adapter differs from the trained one (max |logit diff| {drift})")

    with disabled_adapters(reloaded):
        before = _generate(reloaded, tokenizer, PROMPTS, max_new_tokens)
    with capture_routing(reloaded) as routing:
        after = _generate(reloaded, tokenizer, PROMPTS, max_new_tokens)
    share = torch.stack([g.sum(0) for g in routing.sample_gates().values()]).sum(0)  # (E,)
    share = (share / share.sum()).tolist()

    print(f"\ntrained {steps} steps in {result.metrics['train_runtime']:.1f} s; "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"adapter saved to {adapter_dir}; reloaded into a fresh model: identical logits")
    for prompt, b, a in zip(PROMPTS, before, after):
        print(f"\n> {prompt}\n  base:    {b!r}\n  adapted: {a!r}")
    print("\ngate mass per expert while generating (all layers): "
          + " ".join(f"{s:.3f}" for s in share))
    return {"adapter": str(adapter_dir), "losses": losses, "base": before, "adapted": after,
            "expert_share": share, "seconds": time.time() - start}
