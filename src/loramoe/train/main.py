"""``loramoe train``: fine-tune a causal LM with LoRAMoE, LoRA, Tied LoRA or fully, on instruction data.

The same function backs the command line (flags = parameters, a ``--config`` YAML/JSON file
with the same keys) and Python. The output folder holds the final adapter (or the full model
for ``--method full``), ``train_config.yaml`` (every setting, reusable as ``--config``),
``train_summary.json``, ``checkpoints/`` and TensorBoard logs in ``logs/``.

Scaling out needs no code change: ``accelerate launch --num_processes N -m loramoe.cli train ...``
(DDP; FSDP and DeepSpeed through ``accelerate config``), see docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from transformers import TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from loramoe import models
from loramoe.adapters import LAYER_CLASSES, LoraMoEConfig
from loramoe.attach import attach, trainable_parameters
from loramoe.data import DataCollator, read_records, tokenize_records
from loramoe.errors import OutputFolderError
from loramoe.fileio import atomic_write_text, ensure_writable_folder
from loramoe.folder_lock import hold
from loramoe.serialization import load_adapter, read_adapter_config
from loramoe.train.run_folder import (
    FINAL_STAGING,
    RUN_NAMES,
    check_resume,
    clear,
    data_hash,
    prepare_output,
    publish,
    record_names,
    run_identity,
)
from loramoe.train.settings import adapter_config, adapter_summary, check_init_adapter, check_settings, saved_config
from loramoe.train.trainer import (
    LoraMoETrainer,
    TensorBoardLogs,
    checkpoint_run,
    complete_checkpoints,
    finished_checkpoint,
    remove_incomplete_checkpoints,
)
from loramoe.train.validation import callbacks as validation_callbacks
from loramoe.train.validation import check_validation, outcome, split_validation
from loramoe.train.validation import training_arguments as validation_arguments

logger = logging.getLogger(__name__)

Method = Literal[(*LAYER_CLASSES, "full")]  # from the table, so a new adapter kind is a --method with no edit here
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Importance = Literal["mean", "sum"]
Quantize = Literal["4bit", "8bit"]


def _precision(precision: Precision) -> dict[str, bool]:
    if precision == "auto":
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _main_process() -> bool:
    # the main process alone writes the run folder, and holds it; ``accelerate launch`` and
    # ``torchrun`` number the processes in RANK
    return os.environ.get("RANK", "0") == "0"


def train(
    data: list[str],
    model: str = "smollm2-135m",
    method: Method = "loramoe",
    output: Path = Path("runs/train"),
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    target_modules: list[str] | None = None,
    preset: str | None = None,
    num_experts: int | None = None,
    groups: dict[str, int] | None = None,
    balance_delta: float | None = None,
    balance_weight: float | None = None,
    balance_importance: Importance | None = None,
    route_weight: float | None = None,
    route_target: float | None = None,
    require_types: bool = False,
    columns: list[str] | None = None,
    max_steps: int | None = None,
    epochs: float = 1.0,
    max_length: int = 1024,
    lr: float = 2e-4,
    batch_size: int = 8,
    grad_accum: int = 1,
    group_by_length: bool = False,
    warmup_ratio: float = 0.03,
    scheduler: str = "cosine",
    weight_decay: float = 0.0,
    precision: Precision = "auto",
    gradient_checkpointing: bool = False,
    save_steps: int = 500,
    save_total_limit: int | None = 2,
    logging_steps: int = 10,
    val_data: list[str] | None = None,
    val_split: float | None = None,
    eval_steps: int | None = None,
    early_stopping: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    init_adapter: Path | None = None,
    skip_bad_records: bool = False,
    strict_fields: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
    quantize: Quantize | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """Fine-tune a model on instruction data and write the result to ``output``.

    Args:
        data: training data in the documented record format: files (JSONL, JSON, CSV, Parquet),
            ``datasets`` folders written by ``save_to_disk`` (``folder`` or ``folder:split``), or
            hub datasets (``hub:NAME[:CONFIG]:SPLIT``); see ``columns`` for other column names.
        model: ``smollm2-135m`` (embedded), a local folder or a Hugging Face hub id.
        method: ``loramoe``, ``lora``, ``tied-lora`` or ``full`` fine-tuning.
        output: run folder (final adapter or model, config, summary, checkpoints, logs). It must be
            empty or new, unless ``resume`` or ``overwrite``: a run folder holds one run.
        rank: adapter rank (LoRA and Tied LoRA default 8; LoRAMoE per expert, default 4).
        alpha: adapter scale numerator (LoRA default 16, LoRAMoE 32, Tied LoRA the rank).
        dropout: adapter input dropout (LoRA default 0, LoRAMoE 0.05).
        target_modules: module names or a regex; default the model's MLP projections.
        preset: what Tied LoRA trains: TL6 (tied A, B and per-layer u, v; the default), TL5 (tied
            A, B), vera (u, v over frozen random A, B), or the trained tensors' letters such as Buv.
        num_experts: LoRAMoE experts per projection (default: the sum of groups). Without
            ``groups`` it makes one pool of experts with no groups (a warning says so).
        groups: LoRAMoE expert groups by sample type, e.g. {knowledge: 3, task: 3} (the default).
        balance_delta: delta of the localized balancing constraint (default 0.1).
        balance_weight: beta, the weight of the constraint (default 0.1; 0 turns it off). It balances the
            experts; it does not make a group specialise in its type (see docs/training.md).
        balance_importance: a sample's importance in the constraint: mean (gate sums over its
            tokens divided by their count, so length does not enter; the default) or sum (the raw sums).
        route_weight: weight of the routing objective, an extension beyond the paper that pulls
            each typed sample's gate mass towards its own group (default 0: off).
        route_target: share of a typed sample's gate mass the routing objective sends to its own
            group, in (0, 1) (default 0.9).
        columns: how a source's columns become record fields, ``field=column`` each, e.g.
            ``instruction=question output=answer.value type=@knowledge`` (a dotted path reads a
            nested column, ``@text`` is a constant); for hub datasets and datasets folders above all.
        require_types: every record must have a type that an expert group claims (without it,
            records of types no group claims train untyped, and one warning counts them).
        max_steps: optimizer steps (at least 1); left out, ``epochs`` epochs.
        epochs: passes over the data (above 0) when max_steps is left out.
        max_length: longest sequence in tokens; longer ones are truncated (with a warning).
        lr: peak learning rate.
        batch_size: sequences per device per micro-batch.
        grad_accum: micro-batches per optimizer step.
        group_by_length: batches of records of similar length, in random order (less padding:
            40 % fewer tokens on the lab's mix; see ``loramoe.train.sampling``).
        warmup_ratio: share of the steps spent warming the learning rate up (< 1).
        scheduler: learning-rate schedule (a transformers scheduler name: cosine, linear, constant...).
        weight_decay: AdamW weight decay.
        precision: auto (bf16/fp16 on a GPU that has it, else fp32), fp32, bf16 or fp16.
        gradient_checkpointing: recompute activations in backward to save memory.
        save_steps: write a checkpoint every this many steps.
        save_total_limit: keep at most this many checkpoints (None keeps all).
        logging_steps: log every this many steps.
        val_data: validation data (the same forms as ``data``): its loss is logged every
            ``eval_steps``, and the checkpoint where it is lowest becomes the final adapter.
        val_split: instead of ``val_data``, this share of the records, chosen by their content
            (the same records in every run), held out for validation.
        eval_steps: steps between validations (default: ``save_steps``, of which it must be a divisor).
        early_stopping: stop after this many validations without a lower loss (the Tied LoRA
            paper uses 10); needs ``val_data`` or ``val_split``.
        resume: continue from the last complete checkpoint in ``output/checkpoints``, which must
            have been written by a run with the same settings and data (else an error names the
            first difference).
        overwrite: delete what the run already in ``output`` wrote (the names its
            ``run_manifest.json`` lists) and start again; a folder holding anything else is refused.
        init_adapter: start from a saved adapter (sequential fine-tuning) with its config; adapter
            flags given with other values than the adapter's are refused.
        skip_bad_records: skip malformed records (the count is reported) instead of stopping.
        strict_fields: a record field loramoe does not read (a misspelt ``input`` or ``type``) is an
            error naming the file, line and field, not a warning that counts them.
        seed: seed for initialisation, data order and dropout.
        trust_remote_code: allow a hub model's own code to run.
        quantize: load the base model's linear layers quantized to 4bit (NF4) or 8bit (LLM.int8())
            with bitsandbytes (``pip install 'loramoe[quant]'``), QLoRA-style: their frozen weights
            take about a seventh (4bit) or a quarter (8bit) of their float32 memory; the adapter
            trains in float32 and is the same file as one trained on the unquantized base. Adapter
            methods only.
        callbacks: extra ``transformers.TrainerCallback`` objects (from Python, or class paths
            on the command line), e.g. ones that measure the model during training.
    """
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k != "callbacks"}
    check_settings(settings)
    check_validation(settings)
    started = time.time()
    output = Path(output)
    ensure_writable_folder(output, "--output")
    with hold(output, "--output", "train") if _main_process() else contextlib.nullcontext():
        held = prepare_output(output, resume=resume, overwrite=overwrite)
        reading = {"skip_bad": skip_bad_records, "columns": columns, "strict_fields": strict_fields}
        records, skipped = read_records(data, **reading)
        val_records = read_records(val_data, **reading)[0] if val_data else []
        identity = run_identity(settings, records, val_records)
        if val_split is not None:
            records, val_records = split_validation(records, val_split)
            # which records a split holds out is loramoe's choice, which may change between versions
            identity["held_out_sha256"] = data_hash(val_records)
        checkpoints = output / "checkpoints"
        last_checkpoint = None
        if resume:
            removed = remove_incomplete_checkpoints(checkpoints)
            if removed:
                logger.warning("removed %d incomplete checkpoint(s): %s", len(removed), [p.name for p in removed])
            done = complete_checkpoints(checkpoints)
            last_checkpoint = done[-1] if done else None
            if last_checkpoint is not None:
                check_resume(last_checkpoint, checkpoint_run(last_checkpoint), identity)
            elif held:
                raise OutputFolderError(f"--resume: {output} has no complete checkpoint to continue from, but holds "
                                        "files of a run; --overwrite starts it again")
            else:
                logger.warning("--resume: no complete checkpoint in %s, starting from scratch", checkpoints)
        if init_adapter is not None:
            config, _ = read_adapter_config(init_adapter)
            check_init_adapter(config, settings, Path(init_adapter))
        else:
            config = adapter_config(settings)

        torch.manual_seed(seed)  # the adapter's initialisation
        base, tokenizer = models.load(model, trust_remote_code=trust_remote_code, quantize=quantize)
        if init_adapter is not None:
            load_adapter(base, init_adapter)
        elif config is not None:
            attach(base, config)
        type_ids = None  # types mean nothing to other methods; to LoRAMoE, the index of the group that claims them
        if isinstance(config, LoraMoEConfig):
            type_ids = {name: i for i, name in enumerate(config.groups or {})}
        params = trainable_parameters(base)
        logger.info("%s", params)
        dataset = tokenize_records(records, tokenizer, max_length=max_length, type_ids=type_ids,
                                   require_types=require_types)
        val_dataset = (tokenize_records(val_records, tokenizer, max_length=max_length, type_ids=type_ids)
                       if val_records else None)
        args = TrainingArguments(
            output_dir=str(checkpoints), max_steps=-1 if max_steps is None else max_steps, num_train_epochs=epochs,
            learning_rate=lr, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
            warmup_steps=warmup_ratio, lr_scheduler_type=scheduler, weight_decay=weight_decay, seed=seed,
            data_seed=seed, save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit,
            logging_steps=logging_steps, report_to=[],
            activation_checkpointing=gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False},  # reentrant would cut the router's graph
            remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
            use_cpu=not torch.cuda.is_available(), **_precision(precision),
            **validation_arguments(settings, val_dataset is not None))
        trainer = LoraMoETrainer(model=base, args=args, train_dataset=dataset, eval_dataset=val_dataset,
                                 data_collator=DataCollator(tokenizer), group_by_length=group_by_length,
                                 run_identity=identity,
                                 callbacks=[TensorBoardLogs(output / "logs"), *validation_callbacks(settings),
                                            *callbacks])
        trainer.accelerator.wait_for_everyone()  # every process has checked the folder before it changes
        if trainer.args.should_save:
            if overwrite and held:
                clear(output)  # only now: a run refused above leaves the old one as it was
            record_names(output, RUN_NAMES)
            atomic_write_text(output / "train_config.yaml", yaml.safe_dump(saved_config(settings), sort_keys=False))
        trainer.accelerator.wait_for_everyone()
        if last_checkpoint is not None and finished_checkpoint(last_checkpoint):
            # the Trainer would take one more step from a checkpoint at the end; the run is done, so its
            # result is the checkpoint's
            trainer._load_from_checkpoint(str(last_checkpoint))
            trainer.state = TrainerState.load_from_json(str(last_checkpoint / TRAINER_STATE_NAME))
            result = None
        else:
            result = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)

        staging = output / FINAL_STAGING
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a save cut off by a kill
            staging.mkdir(parents=True)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(staging))  # on every process: a sharded (FSDP) adapter is gathered from all of them
        if trainer.args.should_save:
            if method == "full":
                tokenizer.save_pretrained(staging)
            publish(staging, output)
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        last = history[-1] if history else {}
        summary = {
            "method": method, "model": model, "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch, "records": len(records), "skipped_records": skipped,
            "tokens": int(trainer.state.num_input_tokens_seen), "seconds": round(time.time() - started, 2),
            "train_runtime": result.metrics.get("train_runtime") if result else None,
            "final_loss": last.get("loss"), "final_lm_loss": last.get("lm_loss", last.get("loss")),
            "final_lbc_loss": last.get("lbc_loss"), "final_route_loss": last.get("route_loss"),
            "train_loss": result.training_loss if result else None,
            "trainable_parameters": params.trainable, "total_parameters": params.total,
            "adapter": adapter_summary(config), "data_sha256": identity["data_sha256"],
            "resumed_from": str(last_checkpoint) if last_checkpoint else None,
            "validation": outcome(trainer.state, len(val_records)) if val_dataset is not None else None,
        }
        if trainer.args.should_save:
            atomic_write_text(output / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

