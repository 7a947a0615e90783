"""Teacher-forced scoring: the log-probability a model gives each token of given continuations of
given prompts, the measure that a change of answer *format* cannot fake (lm-eval-harness scores
multiple choice the same way).

A prompt is run once and its key/value cache is shared by all of its continuations (four answer
candidates of one question cost one prompt plus four short continuations, not four whole
sequences). Prompts are left-padded and continuations right-padded, with explicit positions, so a
prompt's scores do not depend on the batch it sits in. Continuations are tokenized apart from
their prompt (``" Lima"`` after ``"The capital of Peru is"``), as lm-eval-harness does.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loramoe.adapters import LoraMoELinear
from loramoe.errors import UsageError
from loramoe.generation import left_pad
from loramoe.inference import eval_mode
from loramoe.routing import capture_routing


@dataclass
class Scored:
    logprobs: list[list[list[float]]]
    """Per prompt, per continuation, the log-probability of each of its tokens."""
    prompt_gates: dict[str, Tensor] | None
    """With ``prompt_routing``: per LoRAMoE layer, (prompts, E) gate means over each prompt's tokens."""


def _chunks(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of prompts of similar length (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def continuation_logprobs(model: nn.Module, prompts: Sequence[list[int]],
                          continuations: Sequence[Sequence[list[int]]], *, pad_id: int, batch_size: int = 64,
                          prompt_routing: bool = False) -> Scored:
    """Per prompt ``i`` and continuation ``j`` of ``continuations[i]`` (token ids, each non-empty),
    the log-probability of each continuation token given the prompt and the tokens before it.
    The model runs in eval mode (restored afterwards), under whatever autocast the caller set.
    ``prompt_routing`` also returns each LoRAMoE layer's mean gates over each prompt's tokens."""
    if len(prompts) != len(continuations):
        raise UsageError(f"{len(prompts)} prompts but {len(continuations)} lists of continuations")
    for i, (prompt, options) in enumerate(zip(prompts, continuations)):
        if not prompt or not options or any(not c for c in options):
            raise UsageError(f"prompt {i}: the prompt and every continuation need at least one token")
    routed = prompt_routing and any(isinstance(m, LoraMoELinear) for m in model.modules())
    out: list[list[list[float]]] = [[] for _ in prompts]
    gates: dict[str, list[tuple[list[int], Tensor]]] = {}
    device = next(model.parameters()).device
    # the decoder, then the head only where it is read: the causal LM's own head on a (batch, 1,
    # width) slice runs as a batched product over a copy of the head per row in bf16 on the CPU,
    # most of the scoring time
    decoder, head = model.base_model, model.get_output_embeddings()
    prefix = f"{model.base_model_prefix}." if decoder is not model else ""  # gate paths named as in the model
    with eval_mode(model):
        for chunk in _chunks([len(p) for p in prompts], batch_size):
            ids, mask = left_pad([prompts[i] for i in chunk], pad_id, device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with capture_routing(decoder) if routed else nullcontext() as record:
                output = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            if routed:
                counts = mask.sum(-1, keepdim=True).float()
                for path, sums in record.layers.items():
                    gates.setdefault(prefix + path, []).append((chunk, sums[0] / counts))
            last = head(output.last_hidden_state[:, -1].contiguous())
            first = F.log_softmax(last.float(), dim=-1)  # (b, V): every first token
            owner = [row for row, i in enumerate(chunk) for _ in continuations[i]]
            options = [c for i in chunk for c in continuations[i]]
            scores = first[owner, [c[0] for c in options]].tolist()
            rest = [[] for _ in options]
            longest = max(map(len, options))
            if longest > 1:  # the last token of each continuation is only ever a target
                index = torch.tensor(owner, device=device)
                cache = output.past_key_values
                cache.batch_select_indices(index)
                width = longest - 1
                cont = torch.full((len(options), width), pad_id, dtype=torch.long)
                cont_mask = torch.zeros((len(options), width), dtype=torch.long)
                for row, c in enumerate(options):
                    cont[row, :len(c) - 1] = torch.tensor(c[:-1])
                    cont_mask[row, :len(c) - 1] = 1
                cont, cont_mask = cont.to(device), cont_mask.to(device)
                start = mask.sum(-1)[index]
                hidden = decoder(input_ids=cont, attention_mask=torch.cat([mask[index], cont_mask], dim=1),
                                 position_ids=start[:, None] + torch.arange(width, device=device),
                                 past_key_values=cache, use_cache=True).last_hidden_state
                # the vocabulary-wide head only where a target follows: most of a padded
                # (options x width) block is padding, and the head is most of the cost there
                logp = F.log_softmax(head(hidden[cont_mask.bool()]).float(), dim=-1)
                targets = torch.tensor([t for c in options for t in c[1:]], device=device)
                picked = logp[torch.arange(len(targets), device=device), targets].tolist()
                at = 0
                for row, c in enumerate(options):
                    rest[row], at = picked[at:at + len(c) - 1], at + len(c) - 1
            for row, owner_row in enumerate(owner):
                out[chunk[owner_row]].append([scores[row], *rest[row]])
    prompt_gates = None
    if routed:
        prompt_gates = {}
        for path, parts in gates.items():
            full = torch.empty(len(prompts), parts[0][1].shape[-1])
            for chunk, values in parts:
                full[chunk] = values.float().cpu()
            prompt_gates[path] = full
    return Scored(out, prompt_gates)
