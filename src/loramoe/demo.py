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
from transformers import PreTrainedTokenizerBase, TrainingArguments

from loramoe import models
from loramoe.adapters import LoraMoEConfig
from loramoe.attach import attach, disabled_adapters, trainable_parameters
from loramoe.data import DataCollator, encode_prompt, read_records, tokenize_records
from loramoe.fileio import ensure_writable_folder
from loramoe.generation import generate
from loramoe.routing import capture_routing
from loramoe.serialization import load_adapter, save_adapter
from loramoe.suites.base import Example
from loramoe.train.trainer import LoraMoETrainer

EXAMPLES = Path(__file__).parent / "examples" / "mini_instructions.jsonl"
"""24 built-in typed instruction examples: closed-book QA (``knowledge``), translation,
summarisation and classification (``task``)."""

PROMPTS = ["Translate to French.\n\nthe green tree", "What is the capital of Peru?"]


def _prompt_batch(tokenizer: PreTrainedTokenizerBase, prompts: list[str]):
    ids = [encode_prompt([{"role": "user", "content": p}], tokenizer) for p in prompts]
    return tokenizer.pad({"input_ids": ids}, return_tensors="pt")


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    examples = [Example(id=str(i), prompt=p) for i, p in enumerate(prompts)]
    return generate(model, tokenizer, examples, style="chat", max_new_tokens=max_new_tokens, progress=False)


def run_demo(model: str = "smollm2-135m", steps: int = 12, lr: float = 3e-4, batch_size: int = 4,
             output: Path = Path("runs/demo"), max_new_tokens: int = 16, seed: int = 0) -> dict[str, Any]:
    """Attach LoRAMoE to a model, train a few steps on built-in typed examples, save, reload and generate.

    Args:
        model: embedded model name (``smollm2-135m``), local folder or Hugging Face hub id.
        steps: optimizer steps.
        lr: peak learning rate (cosine schedule with warmup).
        batch_size: examples per step.
        output: folder for the adapter (``output/adapter``).
        max_new_tokens: tokens generated per prompt.
        seed: random seed for initialisation and data order.
    """
    ensure_writable_folder(output, "--output")
    torch.manual_seed(seed)
    start = time.time()
    base, tokenizer = models.load(model)
    print(f"loaded {model} in {time.time() - start:.1f} s")
    config = LoraMoEConfig()  # the paper's 2 groups of 3 experts: knowledge and task
    attach(base, config)
    print(trainable_parameters(base))

    records, _ = read_records([EXAMPLES])
    data = tokenize_records(records, tokenizer, max_length=256,
                            type_ids={name: i for i, name in enumerate(config.groups)})
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
                                 logging_steps=max(1, steps // 4), save_strategy="no", report_to=[], seed=seed,
                                 use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
        trainer = LoraMoETrainer(model=base, args=args, train_dataset=data,
                          data_collator=DataCollator(tokenizer))
        result = trainer.train()
    losses = [entry["lm_loss"] for entry in trainer.state.log_history if "lm_loss" in entry]
    base.eval()

    adapter_dir = save_adapter(base, Path(output) / "adapter")
    reloaded, _ = models.load(model)
    load_adapter(reloaded, adapter_dir)
    probe = _prompt_batch(tokenizer, PROMPTS)
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
        print(f"\n> {prompt!r}\n  base:    {b!r}\n  adapted: {a!r}")
    print("\ngate mass per expert while generating (all layers): "
          + " ".join(f"{s:.3f}" for s in share))
    return {"adapter": str(adapter_dir), "losses": losses, "base": before, "adapted": after,
            "expert_share": share, "seconds": time.time() - start}
