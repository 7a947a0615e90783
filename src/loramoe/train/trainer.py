"""A Hugging Face ``Trainer`` that knows about loramoe adapters.

What it adds to the stock trainer (schedule, accumulation, mixed precision, checkpointing,
resume, distributed runs and logging all stay the Trainer's):

- the localized balancing constraint and, when ``route_weight`` > 0, the routing objective
  (:mod:`loramoe.balance`): batches carry a ``sample_type`` column (group index, -1 untyped) that
  never reaches the model; the gates come from :func:`loramoe.routing.capture_routing`, so the
  model's forward is untouched and checkpointed recomputations are not counted twice;
- logs of the LM loss, the constraint, the routing objective and the router balance (per sample
  type, the share of gate mass each expert group received), averaged between logging steps, to
  every ``report_to`` target;
- adapter-only checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``) instead of the
  whole model, and a completion marker written last, so a checkpoint killed half-way is never resumed;
  the marker records the run's identity, which ``--resume`` checks, and the checkpoint's files and
  sizes, so one that lost a file counts as incomplete. Rotation deletes an old checkpoint's marker
  before its files: a kill while it deletes leaves an incomplete checkpoint, never a "complete" one
  without its adapter;
- FSDP2 (an ``accelerate launch`` FSDP config): the adapter is gathered from the shards when saved and
  each process takes its shard when loaded, and the optimizer state is written whole; where accelerate
  leaves FSDP off (the CPU) the trainer shards the model itself (see :meth:`LoraMoETrainer._shard`);
- a stop with a clear message on a NaN or infinite loss, leaving the checkpoints as they are;
- optionally, batches of records of similar length in random order (:mod:`loramoe.train.sampling`);
- the LM head applied only where a label follows (``logits_to_keep``): instruction records
  train on their short responses, and vocabulary-wide logits (and their cross-entropy) at every
  prompt position cost a fifth of a step for nothing. The loss is the model's own causal-LM
  loss, summed over label tokens and divided the same way (by ``num_items_in_batch`` when the
  Trainer counts the accumulated batch's tokens, else by this batch's).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed.nn
import torch.nn.functional as F
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from loramoe.adapters import LoraMoEConfig
from loramoe.attach import adapter_config
from loramoe.balance import (
    balancing_loss,
    content_importance,
    group_routing_loss,
    group_shares,
    sample_importance,
)
from loramoe.data import IGNORE_INDEX
from loramoe.errors import LoramoeError, UsageError
from loramoe.fileio import atomic_write_text
from loramoe.routing import capture_routing
from loramoe.serialization import adapter_tensors, load_adapter, save_adapter, write_adapter_folder
from loramoe.train.sampling import LengthGroupedSampler

COMPLETE_MARKER = "loramoe_checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class TrainingDiverged(LoramoeError, RuntimeError):
    """The loss became NaN or infinite."""


def _listed_files_present(checkpoint: Path, marker: Path) -> bool:
    """Whether every file the marker lists is there with its size (a marker of an older loramoe lists
    none, and is taken at its word)."""
    try:
        files = json.loads(marker.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(files, dict):
        return False
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _is_complete(checkpoint: Path) -> bool:
    marker = checkpoint / COMPLETE_MARKER
    return marker.is_file() and _listed_files_present(checkpoint, marker)


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoints under ``folder`` whose completion marker exists and whose files it lists are all
    there, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and _is_complete(p)]
    return [p for _, p in sorted(found)]


def checkpoint_run(checkpoint: str | os.PathLike) -> dict | None:
    """The identity of the run that wrote ``checkpoint`` (see :mod:`loramoe.train.run_folder`), from its
    completion marker; None if the marker records none."""
    return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text()).get("run")


def delete_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Delete ``checkpoint``, its completion marker first: a kill half-way leaves it incomplete."""
    checkpoint = Path(checkpoint)
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def rotate(folder: str | os.PathLike, limit: int | None, best: str | None) -> None:
    """Keep at most ``limit`` checkpoints in ``folder``: the Trainer's choice (the newest and the best
    are kept; the oldest others go), deleted marker first."""
    if limit is None or limit <= 0:
        return
    found = sort_checkpoints(str(folder), use_mtime=True)
    protected = {found[-1], *([str(Path(best))] if best else [])} if found else set()
    excess = len(found) - max(limit, len(protected))
    for checkpoint in [c for c in found if c not in protected][:max(excess, 0)]:
        delete_checkpoint(checkpoint)


def finished_checkpoint(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` was written at the run's last step."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
    return state["global_step"] >= state["max_steps"] > 0


def sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors), whoever sharded it."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def remove_incomplete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Delete checkpoint folders left incomplete by a killed run: without a completion marker (killed
    while saving) or missing a file it lists (killed while rotation deleted it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if _CHECKPOINT_RE.match(p.name) and not _is_complete(p)]
    for p in removed:
        delete_checkpoint(p)
    return removed


def _named_optimizer_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict keyed by parameter position (``Optimizer.state_dict``, the Trainer's
    checkpoints) keyed by parameter name instead, as ``set_optimizer_state_dict`` reads it."""
    saved, current = state["param_groups"], optimizer.param_groups
    if [len(g["params"]) for g in saved] != [len(g["params"]) for g in current]:
        raise UsageError("the checkpoint's optimizer state holds other parameters than this run trains")
    names = {param: name for name, param in model.named_parameters()}
    name_of = {key: names[param] for old, new in zip(saved, current)
               for key, param in zip(old["params"], new["params"])}
    return {"state": {name_of[key]: value for key, value in state["state"].items()},
            "param_groups": [dict(group, params=[name_of[key] for key in group["params"]]) for group in saved]}


class TensorBoardLogs(TensorBoardCallback):
    """TensorBoard event files in a folder of the run's choosing (transformers 5 takes the folder
    only from an environment variable, which would leak into other runs of the process)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        super().__init__()
        self.logging_dir = str(log_dir)


class LoraMoETrainer(Trainer):
    """``Trainer`` for models with a loramoe adapter attached (or none, for full fine-tuning)."""

    def __init__(self, *args, group_by_length: bool = False, run_identity: dict | None = None, **kwargs) -> None:
        self.group_by_length = group_by_length
        self.run_identity = run_identity
        super().__init__(*args, **kwargs)
        config = adapter_config(self.model)
        self.loramoe = config if isinstance(config, LoraMoEConfig) else None
        forward = self.accelerator.unwrap_model(self.model).forward
        self._sparse_logits = ("logits_to_keep" in inspect.signature(forward).parameters and self._loss_shifts_labels
                               and self.label_smoother is None and self.compute_loss_func is None)
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        if fsdp_requested() and not self.is_fsdp_enabled and self.args.world_size > 1:
            self._shard()

    def _shard(self) -> None:
        """Shard the model with FSDP2, as accelerate's FSDP plugin does on GPUs.

        Why here and not accelerate: accelerate turns FSDP on only for GPU-like distributed types;
        on the CPU its state stays ``MULTI_CPU`` and drops the plugin, so the Trainer would wrap the
        model in DDP and every process would hold all of it. So the trainer calls torch's
        ``fully_shard`` itself, with the settings of the FSDP config that ``accelerate launch``
        exported: each transformer layer (the config's ``fsdp_transformer_layer_cls_to_wrap``, else
        the model's ``_no_split_modules``; none with ``NO_WRAP``) is one unit, the root holds the
        rest. A unit mixes the frozen base and the trainable adapter, which FSDP2 allows: only
        parameters with a gradient are reduce-scattered. A tensor shared by several layers (Tied
        LoRA's) cannot be in two units, so such a model is one unit. Every parameter becomes a
        DTensor shard, and the Trainer is told to leave the model alone (its flag for models
        sharded before it, at load time: no DDP wrap).
        """
        from accelerate.utils import FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import fully_shard

        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
        if plugin.fsdp_version != 2:
            raise UsageError(f"FSDP on the CPU needs FSDP2: set fsdp_version: 2 in the accelerate config "
                             f"(it has {plugin.fsdp_version})")
        model = self.accelerator.unwrap_model(self.model)
        if adapter_config(model) is None:
            raise UsageError("FSDP on the CPU trains adapters only: --method full with FSDP needs GPUs "
                             "(accelerate's FSDP plugin), or train it without FSDP")
        names = set(plugin.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or ())
        units = {path: m for path, m in model.named_modules() if type(m).__name__ in names}
        if plugin.auto_wrap_policy is None:  # NO_WRAP
            units = {}
        elif names and not units:
            raise UsageError(f"FSDP: the model has no module of the classes to wrap {sorted(names)}")
        places = defaultdict(set)  # each parameter's units (None: outside them all)
        for name, param in model.named_parameters(remove_duplicate=False):
            places[param].add(next((path for path in units if name.startswith(path + ".")), None))
        if any(len(where) > 1 for where in places.values()):
            units = {}
        settings = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload}
        for unit in units.values():
            fully_shard(unit, **settings)
        fully_shard(model, offload_policy=plugin.cpu_offload)
        self.is_distributed_loading_by_transformers = True

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        if getattr(self.model.config, "distributed_config", None) is not None:  # sharded at load time
            with super()._defer_fsdp_gradient_reduction():
                yield
            return
        # the Trainer's version reads the sharding from the config of a model sharded at load time;
        # this one was sharded by _shard: no gradient reduction until the accumulation's last micro-batch
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _record(self, name: str, value: float) -> None:
        if not math.isnan(value):
            self._sums[name] += value
            self._counts[name] += 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_types = inputs.pop("sample_type", None)
        content_start = inputs.pop("content_start", None)
        if self.loramoe is None or not model.training:
            result = self._lm_loss(model, inputs, return_outputs, num_items_in_batch)
            self._check_finite(result[0] if return_outputs else result)
            return result
        with capture_routing(model, keep_graph=True) as routing:
            lm_loss, outputs = self._lm_loss(model, inputs, True, num_items_in_batch)
        config = self.loramoe
        # per-sample normalisation is local (each process knows its own token counts), before the gather
        importance = sample_importance(torch.stack(list(routing.sample_gates().values())),  # (layers, samples, E)
                                       torch.cat(routing.token_counts), config.balance_importance)
        expert_groups = torch.tensor(config.expert_groups(), device=importance.device)
        if sample_types is None:
            sample_types = torch.full((importance.shape[1],), -1)
        sample_types = sample_types.to(importance.device)
        if self.args.world_size > 1:  # the constraint is over the global batch, as in one process
            importance = torch.cat(torch.distributed.nn.functional.all_gather(importance), dim=1)
            sample_types = torch.cat(self.accelerator.gather(sample_types[None]).unbind(0))
        lbc = sum(balancing_loss(q, sample_types, expert_groups, config.balance_delta) for q in importance)
        extra = config.balance_weight * lbc
        if config.route_weight > 0:
            mask = inputs.get("attention_mask")
            routed = importance
            if content_start is not None and mask is not None:  # each record's own tokens (content_importance)
                routed = content_importance([torch.cat(v) for v in routing.gates.values()], mask, content_start,
                                            config.balance_importance)
                if self.args.world_size > 1:
                    routed = torch.cat(torch.distributed.nn.functional.all_gather(routed), dim=1)
            route = sum(group_routing_loss(q, sample_types, expert_groups, len(config.groups), config.route_target)
                        for q in routed)
            extra = extra + config.route_weight * route
        loss_is_scaled = (self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else
                          (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                          or self.compute_loss_func is not None)
        # when the LM loss is already normalised over the accumulated batch, the Trainer won't
        # divide by the accumulation steps, so the per-micro-batch terms are divided here
        steps = self.current_gradient_accumulation_steps if loss_is_scaled else 1
        loss = lm_loss + extra.to(lm_loss.dtype) / steps
        self._check_finite(loss)
        self._record("lm_loss", lm_loss.item() * (steps / self._lm_scale()))
        self._record("lbc_loss", lbc.item())
        if config.route_weight > 0 and (sample_types >= 0).any():  # an all-untyped batch has no say in it
            self._record("route_loss", route.item())
        self._record_balance(importance, sample_types, expert_groups)
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or dataset is None:
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * max(1, self.args.world_size)
        return LengthGroupedSampler([len(row["input_ids"]) for row in dataset], batch, seed=self.args.seed)

    def _lm_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The causal-LM loss, from logits at the positions whose next token is a label."""
        labels = inputs.get("labels")
        if not (self._sparse_logits and model.training and labels is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        targets = labels[:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # shared by the batch's rows
        outputs = model(**inputs, logits_to_keep=keep)
        logits = outputs.logits.float()
        picked = targets[:, keep].to(logits.device)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), picked.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        if num_items_in_batch is None:
            loss = loss / (picked != IGNORE_INDEX).sum().clamp(min=1)
        else:
            loss = loss / num_items_in_batch * self._lm_scale()
        return (loss, outputs) if return_outputs else loss

    def _lm_scale(self) -> float:
        """The factor the Trainer put on the LM loss for distributed token averaging."""
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
            return float(self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                         else self.args.n_gpu)
        return 1.0

    def _record_balance(self, importance: torch.Tensor, sample_types: torch.Tensor,
                        expert_groups: torch.Tensor) -> None:
        if self.loramoe.groups is None:
            return
        names = list(self.loramoe.groups)
        shares = group_shares(importance.detach().sum(0), sample_types, expert_groups, len(names))  # over layers
        for t, type_name in enumerate(names):
            for g, group_name in enumerate(names):
                self._record(f"router/{type_name}_to_{group_name}", shares[t, g].item())

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            done = complete_checkpoints(self.args.output_dir)
            last = str(done[-1]) if done else "none yet"
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.state.global_step}: training stopped. Last complete "
                f"checkpoint: {last}. Lower --lr, check the data, or use fp32/bf16 instead of fp16.")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the averages since the previous one
            for name, total in self._sums.items():
                logs[name] = total / self._counts[name]
            self._sums.clear()
            self._counts.clear()
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter (or, for full fine-tuning, the model) from the main process. With a
        sharded model, every process must call it: the adapter is gathered from all of them."""
        if adapter_config(self.model) is None or not sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        # the Trainer's FSDP path would gather the whole model, base included, to save the adapter
        model = self.accelerator.unwrap_model(self.model)
        tensors = adapter_tensors(model)
        if self.args.should_save:
            write_adapter_folder(model, output_dir or self.args.output_dir, adapter_config(model), tensors)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if adapter_config(self.model) is None:
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            save_adapter(self.model, output_dir or self.args.output_dir)

    def _load_adapter(self, model, folder: str) -> None:
        from torch.distributed.tensor.experimental import implicit_replication

        # on a sharded model each parameter is a DTensor shard: the file's tensor is taken as
        # replicated, and each process copies its own shard of it (no communication)
        with implicit_replication() if sharded(model) else contextlib.nullcontext():
            load_adapter(model, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if adapter_config(self.model) is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_adapter(model or self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if adapter_config(self.model) is None:
            return super()._load_best_model()
        self._load_adapter(self.model, self.state.best_model_checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if adapter_config(self.model) is None or not sharded(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        # the Trainer's FSDP path would also save the whole model; the optimizer state (of the adapter
        # only) is gathered whole, keyed by parameter name, so a run with or without FSDP resumes it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.accelerator.unwrap_model(self.model), self._inner_optimizer(),
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            with warnings.catch_warnings(record=True):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        file = os.path.join(checkpoint, OPTIMIZER_NAME) if checkpoint is not None else ""
        if adapter_config(self.model) is None or not os.path.isfile(file):
            return super()._load_optimizer_and_scheduler(checkpoint)
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        model, optimizer = self.accelerator.unwrap_model(self.model), self._inner_optimizer()
        if any(not isinstance(key, str) for group in state["param_groups"] for key in group["params"]):
            if not sharded(model):
                return super()._load_optimizer_and_scheduler(checkpoint)
            state = _named_optimizer_state(state, model, optimizer)  # written by a run without FSDP
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # each process takes its shard of the whole state (or all of it, resumed without FSDP)
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        with warnings.catch_warnings(record=True):
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds it

    def _save_checkpoint(self, model, trial) -> None:
        # old checkpoints go only once the new one is complete: the Trainer deletes them as soon as
        # it has written the new folder, and a kill before its marker would leave none to resume
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            folder = Path(run_dir) / f"checkpoint-{self.state.global_step}"
            files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
                     if p.is_file() and p.name != COMPLETE_MARKER}
            marker = {"global_step": self.state.global_step, "run": self.run_identity, "files": files}
            atomic_write_text(folder / COMPLETE_MARKER, json.dumps(marker, indent=2))
            rotate(run_dir, limit, self.state.best_model_checkpoint)
