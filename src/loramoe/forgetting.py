"""What fine-tuning cost: knowledge lost, general-text loss gained, parameters moved.

- ``knowledge_change``: accuracy on the same questions before and after, and which facts were lost
  and which gained.
- ``distribution_shift``: the forgetting metric of arXiv 2401.05605 on general text. With ``p_b``
  the base model's next-token distribution and ``p_f`` the fine-tuned one, per token:
  ``CE(p_b, p_f) = H(p_b) + KL(p_b || p_f)``, its excess over the base model (the KL), and the
  top-1 variant (the cross-entropy of ``p_f`` on the base model's argmax token). For adapters one
  pass over the text runs the model with the adapter on and off: no second copy of the model.
- ``parameter_drift``: ``||W_ft - W0|| / ||W0||`` per layer and module (Frobenius norms).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from loramoe.adapters import LoraMoELinear
from loramoe.adapters.base import SUPPORTED_BASE_LAYERS, AdapterLayer, MergeError
from loramoe.attach import adapter_config, adapter_layers, disabled_adapters
from loramoe.errors import UsageError
from loramoe.inference import eval_mode
from loramoe.quantized import dense_weight, is_quantized


def knowledge_change(base: Mapping[str, bool], tuned: Mapping[str, bool]) -> dict:
    """Per-question correctness (by example id) before and after fine-tuning -> accuracies, their
    drop, and the ids of facts lost (right before, wrong after) and gained."""
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise UsageError(f"base and tuned results cover different questions, e.g. {missing[0]!r}")
    ids = sorted(base)
    lost = [i for i in ids if base[i] and not tuned[i]]
    gained = [i for i in ids if tuned[i] and not base[i]]
    n = len(ids) or 1
    base_acc, tuned_acc = sum(base.values()) / n, sum(tuned.values()) / n
    return {"questions": len(ids), "base_accuracy": base_acc, "tuned_accuracy": tuned_acc,
            "accuracy_drop": base_acc - tuned_acc, "lost": lost, "gained": gained,
            "kept": sum(1 for i in ids if base[i] and tuned[i])}


@dataclass
class _Sums:
    tokens: int = 0
    base_entropy: float = 0.0
    cross_entropy: float = 0.0
    top1_cross_entropy: float = 0.0
    data_ce_base: float = 0.0
    data_ce_tuned: float = 0.0

    def add(self, base_logits: Tensor, tuned_logits: Tensor, targets: Tensor, mask: Tensor) -> None:
        log_pb = F.log_softmax(base_logits.float(), dim=-1)  # (B, T, V)
        log_pf = F.log_softmax(tuned_logits.float(), dim=-1)
        pb = log_pb.exp()
        m = mask.float()
        self.tokens += int(m.sum())
        self.base_entropy += float(-(pb * log_pb).sum(-1).mul(m).sum())
        self.cross_entropy += float(-(pb * log_pf).sum(-1).mul(m).sum())
        top1 = base_logits.argmax(-1, keepdim=True)
        self.top1_cross_entropy += float(-log_pf.gather(-1, top1).squeeze(-1).mul(m).sum())
        self.data_ce_base += float(-log_pb.gather(-1, targets[..., None]).squeeze(-1).mul(m).sum())
        self.data_ce_tuned += float(-log_pf.gather(-1, targets[..., None]).squeeze(-1).mul(m).sum())

    def result(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        ce, h = self.cross_entropy / n, self.base_entropy / n
        return {"tokens": self.tokens, "forgetting_ce": ce, "base_entropy": h, "kl": ce - h,
                "top1_ce": self.top1_cross_entropy / n, "base_lm_loss": self.data_ce_base / n,
                "tuned_lm_loss": self.data_ce_tuned / n,
                "lm_loss_increase": (self.data_ce_tuned - self.data_ce_base) / n}


@torch.no_grad()
def distribution_shift(model: nn.Module, tokenizer, texts: Sequence[str], *, base_model: nn.Module | None = None,
                       batch_size: int = 8, max_length: int = 256, progress: bool = True) -> dict[str, float]:
    """Forgetting on general text, token-weighted over ``texts``: ``forgetting_ce`` (CE of the
    tuned model against the base model's distribution), ``base_entropy``, ``kl`` (their
    difference), ``top1_ce``, and the plain LM losses on the text of both models and their
    difference (``lm_loss_increase``). Adapters are switched off for the base pass; a fully
    fine-tuned model needs ``base_model``."""
    if base_model is None and adapter_config(model) is None:
        raise UsageError("distribution_shift: the model has no adapter to switch off; pass base_model")
    sums = _Sums()
    device = next(model.parameters()).device
    with eval_mode(model, tokenizer, padding_side="right"):  # positions count from each text's first token
        for start in tqdm(range(0, len(texts), batch_size), desc="forgetting", disable=not progress):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length).to(device)
            tuned = model(**batch).logits[:, :-1]
            if base_model is not None:
                base = base_model(**batch).logits[:, :-1]
            else:
                with disabled_adapters(model):
                    base = model(**batch).logits[:, :-1]
            mask = batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]
            sums.add(base, tuned, batch["input_ids"][:, 1:], mask)
    return sums.result()


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_and_module(path: str) -> tuple[int | None, str]:
    match = _LAYER_INDEX.search(path)
    return (int(match.group(1)) if match else None), path[match.end():] if match else path


def _effective_delta(layer: AdapterLayer) -> tuple[Tensor, dict]:
    """The update and, for LoRAMoE, how it was bounded."""
    if isinstance(layer, LoraMoELinear):
        # the router mixes the experts per token with softmax weights that sum to 1, so the update
        # at any token is a convex combination of the experts' updates: the largest expert update
        # bounds it, and the plain average is the update under uniform routing
        experts = torch.einsum("eor,eri->eoi", layer.lora_B.float(), layer.lora_A.float()) * layer.scale
        norms = experts.flatten(1).norm(dim=1)
        return experts[norms.argmax()], {"uniform_mixture": experts.mean(0)}
    try:
        return layer.delta_weight().float(), {}
    except MergeError:
        raise UsageError(f"{type(layer).__name__} has no weight update to measure") from None


@torch.no_grad()
def parameter_drift(model: nn.Module, base_state: Mapping[str, Tensor] | None = None) -> list[dict]:
    """``||W_ft - W0|| / ||W0||`` per adapted (or, with ``base_state``, per linear) module, as rows
    ``{path, layer, module, drift}``. Adapters: from the weight update the adapter adds (LoRA: the
    merged update; LoRAMoE: the largest expert's update, which bounds the per-token update, with
    ``drift_uniform`` the average expert's). Full fine-tuning: the model's weights against
    ``base_state`` (the base model's ``state_dict()``)."""
    rows = []
    if adapter_config(model) is not None:
        for path, layer in adapter_layers(model):
            delta, extra = _effective_delta(layer)
            base = layer.base_layer
            w0 = (dense_weight(base) if is_quantized(base) else base.weight).float()
            w0 = w0.T if w0.shape != delta.shape else w0  # Conv1D stores (d_in, d_out)
            layer_index, module = _layer_and_module(path)
            row = {"path": path, "layer": layer_index, "module": module,
                   "drift": float(delta.norm() / w0.norm())}
            if "uniform_mixture" in extra:
                row["drift_uniform"] = float(extra["uniform_mixture"].norm() / w0.norm())
            rows.append(row)
        return rows
    if base_state is None:
        raise UsageError("parameter_drift: the model has no adapter; pass the base model's state_dict as base_state")
    for path, module in model.named_modules():
        if isinstance(module, SUPPORTED_BASE_LAYERS):
            w0 = base_state[f"{path}.weight"].float().to(module.weight.device)
            layer_index, name = _layer_and_module(path)
            rows.append({"path": path, "layer": layer_index, "module": name,
                         "drift": float((module.weight.float() - w0).norm() / w0.norm())})
    return rows


def summarize_drift(rows: Iterable[dict]) -> dict[str, float]:
    """Mean drift per module name (``mlp.gate_proj`` ...) and overall."""
    by_module: dict[str, list[float]] = {}
    for row in rows:
        by_module.setdefault(row["module"], []).append(row["drift"])
    summary = {name: sum(v) / len(v) for name, v in sorted(by_module.items())}
    everything = [d for v in by_module.values() for d in v]
    summary["mean"] = sum(everything) / len(everything) if everything else 0.0
    return summary
