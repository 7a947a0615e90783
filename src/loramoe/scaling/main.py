"""``loramoe scaling``: the forgetting scaling laws of arXiv 2401.05605, measured and fitted.

One training run per method and size (``loramoe train`` with a measuring callback): the size is
the rank for ``lora`` and ``tied-lora`` and the number of experts for ``loramoe`` (each expert of
rank ``expert_rank``); ``full`` has one size. Every ``eval_every`` steps the callback records

- the fine-tuning loss ``L_ft``: the LM loss on the answers of held-out fine-tuning records
  (records split off the fine-tuning data, never trained on), as the paper uses the fine-tuning
  loss rather than the noisy loss of one training batch;
- the forgetting ``L_f`` on held-out general text (the shipped Wikipedia paragraphs, or ``--text``),
  from :func:`loramoe.forgetting.distribution_shift`: the cross-entropy against the base model's
  distribution, its KL excess and the top-1 variant, the adapter on and off in one pass.

Step 0 is the base model (the adapters start as the identity), measured once per sweep. The laws
are fitted per method by :mod:`loramoe.scaling.report`. Adapters are scaled as in the paper's
rsLoRA runs: ``alpha = scale * sqrt(r)``, so the update is ``scale / sqrt(r) * B A`` at every rank.
A run whose ``points.json`` holds the same settings is reused, not trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import TrainerCallback

from loramoe import models
from loramoe.adapters import LoraConfig
from loramoe.attach import attach
from loramoe.data import IGNORE_INDEX, DataCollator, read_records, tokenize_records
from loramoe.errors import UsageError
from loramoe.fileio import atomic_write_text, ensure_writable_folder
from loramoe.folder_lock import hold
from loramoe.forgetting import distribution_shift
from loramoe.inference import eval_mode
from loramoe.scaling.report import write_report
from loramoe.suites import load_suite, to_training_records
from loramoe.suites.registry import LM_LOSS, TASKS
from loramoe.train.main import Method, train

Metric = Literal["forgetting_ce", "kl", "top1_ce"]

DEFAULTS = dict(ranks=[1, 2, 4, 8, 16], steps=20, eval_every=5, texts=6, text_max_length=48, heldout=16,
                max_length=96, batch_size=2)
"""The default sweep: 2 methods x 5 sizes in under 30 minutes on a shared 2-core CPU."""
QUICK = dict(ranks=[1, 2], steps=8, eval_every=2, texts=4, text_max_length=32, heldout=4, max_length=64,
             batch_size=2)
"""``--quick``: the same pipeline in a few minutes, for CI (the fits are not meaningful)."""


def heldout_loss(model: torch.nn.Module, dataset, collator: DataCollator, batch_size: int = 8) -> float:
    """Token-weighted LM loss over the labelled (answer) tokens of a tokenized dataset."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))  # little padding
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in order[start:start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items() if k != "sample_type"}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise UsageError("the held-out fine-tuning records have no answer tokens to score")
    return total / count


class ForgettingProbe(TrainerCallback):
    """Every ``eval_every`` optimizer steps (and at the last), measures the fine-tuning loss on
    held-out records and the forgetting on general text, appending a point to ``points``."""

    def __init__(self, tokenizer, texts: Sequence[str], heldout, *, eval_every: int, text_max_length: int,
                 base_model: torch.nn.Module | None = None, batch_size: int = 8) -> None:
        self.tokenizer, self.texts, self.heldout = tokenizer, list(texts), heldout
        self.eval_every, self.text_max_length, self.batch_size = eval_every, text_max_length, batch_size
        self.base_model = base_model
        self.collator = DataCollator(tokenizer)
        self.points: list[dict[str, float]] = []

    def measure(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        if self.base_model is not None:  # the Trainer may have moved the model to an accelerator
            self.base_model.to(next(model.parameters()).device)
        shift = distribution_shift(model, self.tokenizer, self.texts, base_model=self.base_model,
                                   batch_size=self.batch_size, max_length=self.text_max_length, progress=False)
        point = {"step": step, "fine_tuning_loss": heldout_loss(model, self.heldout, self.collator, self.batch_size),
                 **{k: shift[k] for k in ("forgetting_ce", "kl", "top1_ce", "base_entropy", "lm_loss_increase")}}
        self.points.append(point)
        return point

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_every == 0 or state.global_step == state.max_steps:
            self.measure(model, state.global_step)


def general_texts(text: Path | None, count: int) -> list[str]:
    """The first ``count`` held-out texts: paragraphs (separated by blank lines) of ``text``, or
    the test side of the shipped Wikipedia paragraphs (``load_suite("lm-loss")``)."""
    if text is None:
        return [example.prompt for example in load_suite(LM_LOSS)[0].test[:count]]
    path = Path(text)
    if not path.is_file():
        raise UsageError(f"--text {path}: no such file")
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not paragraphs:
        raise UsageError(f"--text {path}: no text (paragraphs are separated by blank lines)")
    return paragraphs[:count]


def _fitting(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """The records whose whole sample fits in ``max_length`` tokens, so no answer is cut away."""
    short = [r for r in records if len(r["instruction"]) + len(r["output"]) <= 6 * max_length]
    if not short:
        return []
    parsed, _ = read_records([short])
    lengths = tokenize_records(parsed, tokenizer, max_length=10**9)["input_ids"]
    return [record for record, ids in zip(short, lengths) if len(ids) <= max_length]


def fine_tuning_data(data: Sequence[str] | None, folder: Path, tokenizer, *, max_length: int, heldout: int,
                     seed: int) -> tuple[Path, Path]:
    """Writes ``train.jsonl`` and ``heldout.jsonl`` to ``folder``: the given data, or by default
    the downstream-task train splits of the built-in suites that fit ``max_length`` (type
    ``task``); ``heldout`` records, picked by a hash of their position, are held out."""
    if data:
        records, _ = read_records(list(data))
        rows = [{"messages": r.messages, **({"type": r.type} if r.type else {})} for r in records]
    else:
        examples = [e for bench in load_suite(TASKS, seed=seed) for e in bench.train]
        rows = _fitting(to_training_records(examples, type="task", seed=seed), tokenizer, max_length)
    if len(rows) <= heldout:
        raise UsageError(f"{len(rows)} fine-tuning records: need more than --heldout {heldout}")

    def rank(index: int) -> bytes:
        return hashlib.sha256(f"{seed}:heldout:{index}".encode()).digest()

    held = set(sorted(range(len(rows)), key=rank)[:heldout])
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, keep in zip(paths, (lambda i: i not in held, lambda i: i in held)):
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for i, row in enumerate(rows) if keep(i)))
    return paths


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:16]


def _run_one(settings: dict[str, Any], folder: Path, make_probe: Callable[[], ForgettingProbe],
             base_point: dict) -> dict:
    """Trains one size of one method (or reuses a finished run with the same settings)."""
    cached = folder / "points.json"
    if cached.is_file():
        run = json.loads(cached.read_text())
        if run.get("settings") == settings:
            return run
    probe = make_probe()
    shutil.rmtree(folder, ignore_errors=True)  # an earlier run with other settings, or one cut off
    method, size = settings["method"], settings["size"]
    rank = settings["expert_rank"] if method == "loramoe" else size
    adapter = {} if method == "full" else {"rank": rank, "alpha": settings["scale"] * math.sqrt(rank),
                                           "dropout": settings["dropout"]}
    started = time.time()
    summary = train(data=[settings["data"]], model=settings["model"], method=method, output=folder, **adapter,
                    num_experts=size if method == "loramoe" else None, max_steps=settings["steps"],
                    max_length=settings["max_length"], lr=settings["lr"], batch_size=settings["batch_size"],
                    warmup_ratio=settings["warmup_ratio"], scheduler=settings["scheduler"],
                    save_steps=settings["steps"] + 1, logging_steps=settings["eval_every"], seed=settings["seed"],
                    callbacks=[probe])
    run = {"settings": settings, "method": method, "size": size,
           "trainable_parameters": summary["trainable_parameters"], "seconds": round(time.time() - started, 1),
           "points": [base_point, *probe.points]}
    atomic_write_text(cached, json.dumps(run, indent=2) + "\n")
    return run


def scaling(
    model: str = "smollm2-135m",
    data: list[str] | None = None,
    method: list[Method] = ["lora", "loramoe"],  # noqa: B006 (never mutated; --help shows the list)
    ranks: list[int] | None = None,
    steps: int | None = None,
    eval_every: int | None = None,
    exclude_steps: int | None = None,
    text: Path | None = None,
    texts: int | None = None,
    text_max_length: int | None = None,
    heldout: int | None = None,
    metric: Metric = "forgetting_ce",
    output: Path = Path("runs/scaling"),
    quick: bool = False,
    expert_rank: int = 4,
    scale: float = 8.0,
    dropout: float = 0.0,
    lr: float = 1e-3,
    batch_size: int | None = None,
    max_length: int | None = None,
    warmup_ratio: float = 0.1,
    scheduler: str = "constant_with_warmup",
    threads: int | None = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Sweep sizes and steps, record fine-tuning loss and forgetting, fit the two laws of arXiv
    2401.05605 and write ``scaling.json``, ``scaling.md`` and PNG plots to ``output``.

    Args:
        model: ``smollm2-135m`` (embedded), a local folder or a Hugging Face hub id.
        data: fine-tuning files (the ``loramoe train`` format); default: the built-in downstream-task
            train splits that fit ``max_length``, written to ``output/data`` (with the held-out part).
        method: one or several of lora, tied-lora, loramoe, full.
        ranks: sizes: the rank for lora and tied-lora, the number of experts for loramoe (default 1 2 4 8 16).
        steps: optimizer steps per run (default 20).
        eval_every: measure every this many steps (default 5).
        exclude_steps: fit only points after this step (default: the first fifth of the steps,
            as the paper left out its first 50 of 260).
        text: held-out general text file, paragraphs separated by blank lines (default: the
            shipped Wikipedia paragraphs).
        texts: how many paragraphs to measure forgetting on (default 6).
        text_max_length: tokens per paragraph (default 48).
        heldout: fine-tuning records held out for the fine-tuning loss (default 16).
        metric: the forgetting the laws are fitted to: forgetting_ce (the paper's L_f), kl or top1_ce.
        output: folder for the runs, the data, scaling.json, scaling.md and the plots.
        quick: a small sweep for CI (sizes 1 2, 8 steps, ...); flags given explicitly still win.
        expert_rank: rank of each LoRAMoE expert.
        scale: rsLoRA scale: alpha = scale * sqrt(rank), for every adapter kind.
        dropout: adapter dropout (0 keeps LoRAMoE with one expert equal to LoRA of its rank).
        lr: peak learning rate.
        batch_size: sequences per step (default 2).
        max_length: longest fine-tuning sample in tokens (default 96).
        warmup_ratio: share of the steps spent warming the learning rate up.
        scheduler: learning-rate schedule; constant after warmup, so late steps still move the model.
        threads: torch CPU threads during the sweep (None: torch's default). One avoids the
            OpenMP contention that made a step ~8x slower on a shared 2-core machine.
        seed: seed for data, initialisation and order.
    """
    preset = QUICK if quick else DEFAULTS
    given = dict(ranks=ranks, steps=steps, eval_every=eval_every, texts=texts, text_max_length=text_max_length,
                 heldout=heldout, max_length=max_length, batch_size=batch_size)
    opts = {key: preset[key] if value is None else value for key, value in given.items()}
    if not method:
        raise UsageError("--method: give at least one method")
    if not opts["ranks"] or any(r < 1 for r in opts["ranks"]):
        raise UsageError(f"--ranks must be positive sizes, got {opts['ranks']}")
    if opts["steps"] < 1 or not 1 <= opts["eval_every"] <= opts["steps"]:
        raise UsageError(f"--eval-every must be in [1, --steps]; got {opts['eval_every']} and {opts['steps']}")
    exclude = opts["steps"] // 5 if exclude_steps is None else exclude_steps
    started = time.time()
    output = ensure_writable_folder(output, "--output")  # before hours of work, not after
    with hold(output, "--output", "scaling"):
        previous_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            base, tokenizer = models.load(model)
            train_file, heldout_file = fine_tuning_data(data, output / "data", tokenizer, max_length=opts["max_length"],
                                                        heldout=opts["heldout"], seed=seed)
            held_records, _ = read_records([heldout_file])
            held = tokenize_records(held_records, tokenizer, max_length=opts["max_length"])
            general = general_texts(text, opts["texts"])
            base_probe = ForgettingProbe(tokenizer, general, held, eval_every=1,
                                         text_max_length=opts["text_max_length"])
            base_point = base_probe.measure(attach(base, LoraConfig(r=1)), 0)  # B = 0: the base model itself
            common = dict(model=model, data=str(train_file), data_digest=_digest(train_file.read_bytes()),
                          heldout_digest=_digest(heldout_file.read_bytes()),
                          texts_digest=_digest(json.dumps(general).encode()),
                          text_max_length=opts["text_max_length"], steps=opts["steps"], eval_every=opts["eval_every"],
                          max_length=opts["max_length"], batch_size=opts["batch_size"], lr=lr,
                          warmup_ratio=warmup_ratio, scheduler=scheduler, scale=scale, dropout=dropout,
                          expert_rank=expert_rank, seed=seed)

            def make_probe(full: bool) -> ForgettingProbe:
                return ForgettingProbe(tokenizer, general, held, eval_every=opts["eval_every"],
                                       text_max_length=opts["text_max_length"],
                                       base_model=models.load(model)[0] if full else None)

            plan = [(m, size) for m in dict.fromkeys(method) for size in ([0] if m == "full" else opts["ranks"])]
            runs = [_run_one({**common, "method": m, "size": size}, output / "runs" / f"{m}-{size}",
                             partial(make_probe, m == "full"), base_point)
                    for m, size in tqdm(plan, desc="scaling runs", unit="run")]
        finally:
            torch.set_num_threads(previous_threads)
        settings = {**common, "method": list(dict.fromkeys(method)), "ranks": opts["ranks"], "exclude_steps": exclude,
                    "metric": metric, "quick": quick, "threads": threads}
        return write_report(runs, settings, output, seconds=round(time.time() - started, 1))
