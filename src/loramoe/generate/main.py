"""``loramoe generate``: talk to a base model with an adapter, or to a fully fine-tuned model.

Three ways in: one prompt (its answer streamed as it comes), a file of prompts (one JSON line out
per prompt, in order), or an interactive chat that keeps the conversation. Prompts are rendered
as training renders them (the chat template, or the plain template without one), so an adapter
sees what it was trained on. Decoding is greedy unless ``temperature`` > 0, and is
``transformers``' ``generate``; streaming is its ``TextStreamer``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from loramoe import models
from loramoe.adapters import LoraMoEConfig
from loramoe.attach import adapter_config
from loramoe.data import encode_prompt
from loramoe.errors import DataError, MissingFileError, OutputFolderError, UsageError
from loramoe.fileio import atomic_write_text, ensure_writable_folder
from loramoe.generate.routing_strip import render, token_shares
from loramoe.generation import answer_end, stop_token_ids
from loramoe.inference import eval_mode
from loramoe.routing import capture_routing
from loramoe.serialization import CONFIG_NAME, load_adapter, read_adapter_config


def read_prompts(file: Path) -> list[list[dict[str, str]]]:
    """A file's prompts as conversations: a line is the prompt's text, or a JSON object with
    ``prompt`` (and ``system``) or ``messages`` (a conversation ending with a user turn)."""
    if not file.is_file():
        raise MissingFileError(f"--prompts {file}: no such file")
    conversations = []
    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            conversations.append([{"role": "user", "content": line}])
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise DataError(f"{file}:{lineno}: invalid JSON: {error}") from None
        if isinstance(row.get("messages"), list) and row["messages"] and row["messages"][-1].get("role") == "user":
            conversations.append(row["messages"])
        elif isinstance(row.get("prompt"), str):
            system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
            conversations.append([*system, {"role": "user", "content": row["prompt"]}])
        else:
            raise DataError(f"{file}:{lineno}: expected a field 'prompt' (a string) or 'messages' ending with a "
                            "user turn")
    if not conversations:
        raise DataError(f"--prompts {file}: no prompts")
    return conversations


def check_adapter_folder(adapter: Path, flag: str) -> None:
    """Refuse, before any model loads, a folder that holds no adapter or a bad adapter config."""
    if not (Path(adapter) / CONFIG_NAME).is_file():
        hint = (" (it holds a full model: pass it as --model)" if (Path(adapter) / "config.json").is_file()
                else "")
        raise MissingFileError(f"--adapter {flag}: no {CONFIG_NAME} there{hint}")
    read_adapter_config(adapter)


def load_for_generation(model: str, adapter: Path | None, trust_remote_code: bool = False
                        ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model with its adapter attached (any kind), in eval mode."""
    if adapter is not None:
        check_adapter_folder(adapter, str(adapter))
    loaded, tokenizer = models.load(model, trust_remote_code=trust_remote_code)
    if adapter is not None:
        load_adapter(loaded, adapter)
    return loaded.eval(), tokenizer


def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
           config: GenerationConfig, *, stream: bool = False, show_routing: bool = False) -> dict[str, Any]:
    """The model's answer to a conversation ending with a user turn (and, with ``show_routing``,
    each generated token's gate share per expert group)."""
    ids = torch.tensor([encode_prompt(messages, tokenizer)], device=model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    adapter = adapter_config(model)
    routed = show_routing and isinstance(adapter, LoraMoEConfig)
    with eval_mode(model), torch.no_grad():
        if routed:
            with capture_routing(model, per_token=True) as record:
                output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                        streamer=streamer)
        else:
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                    streamer=streamer)
    new = output[0, ids.shape[1]:].tolist()
    end = answer_end(new, set(config.eos_token_id or []))
    result: dict[str, Any] = {"messages": messages, "response": tokenizer.decode(new[:end], skip_special_tokens=True)}
    if routed:
        result["tokens"] = [tokenizer.decode([token]) for token in new[:end]]
        result["routing"] = token_shares(record, adapter, len(new))[:end]
    return result


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse, before the model loads, an ``output`` the answers could not be saved to at the end
    of the run, or one that would replace a file without ``overwrite``."""
    if output.is_dir():
        raise OutputFolderError(f"--output {output}: is a folder; --output names the JSON Lines file to write, e.g. "
                                f"{output / 'answers.jsonl'}")
    if output.exists() and not overwrite:
        raise OutputFolderError(f"--output {output}: the file exists; give a new file, or --overwrite to replace it")
    ensure_writable_folder(output.parent, "--output")


def generate(
    model: str = "smollm2-135m",
    adapter: Path | None = None,
    prompt: str | None = None,
    prompts: Path | None = None,
    chat: bool = False,
    system: str | None = None,
    output: Path | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    show_routing: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Generate answers with a model and an optional adapter.

    Args:
        model: ``smollm2-135m`` (embedded), a local folder (a fully fine-tuned run) or a hub id.
        adapter: a saved adapter folder of any kind (a ``loramoe train`` output folder).
        prompt: one prompt; its answer is streamed as it is generated. ``loramoe generate "..."``
            gives it without the flag.
        prompts: a file of prompts, one per line (text, or JSON with ``prompt`` or ``messages``);
            one JSON line per prompt goes to ``output``, or to standard output.
        chat: an interactive chat that keeps the conversation (an empty line or end of input ends it).
        system: a system message put before every conversation.
        output: the JSON Lines file for ``prompts`` (written atomically at the end); a file that
            exists already is refused unless ``overwrite``.
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 decodes greedily; above 0 samples at this temperature.
        top_p: nucleus sampling's probability mass (with ``temperature`` > 0).
        show_routing: for a LoRAMoE adapter, after each answer, each token's gate share per
            expert group (a coloured strip in a terminal, numbers elsewhere).
        seed: seed for sampling.
        trust_remote_code: allow a hub model's own code to run.
        overwrite: replace the file ``output`` names if it exists.
    """
    if sum([prompt is not None, prompts is not None, chat]) != 1:
        raise UsageError("give one of: a prompt, --prompts FILE or --chat")
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise UsageError(f"--max-new-tokens must be at least 1, --temperature at least 0 and --top-p in (0, 1]; got "
                         f"{max_new_tokens}, {temperature} and {top_p}")
    if output is not None and prompts is None:
        raise UsageError("--output is the JSON Lines file of --prompts")
    if overwrite and output is None:
        raise UsageError("--overwrite replaces the file of --output; give --output too")
    conversations = read_prompts(Path(prompts)) if prompts is not None else None
    if output is not None:
        _check_output(Path(output), overwrite)
    torch.manual_seed(seed)
    loaded, tokenizer = load_for_generation(model, adapter, trust_remote_code)
    if show_routing and not isinstance(adapter_config(loaded), LoraMoEConfig):
        raise UsageError("--show-routing needs a LoRAMoE adapter (--adapter)")
    stops = stop_token_ids(loaded, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None,
                              top_p=top_p if temperature > 0 else None, num_beams=1, eos_token_id=stops or None,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                              (stops[0] if stops else None))
    head = [{"role": "system", "content": system}] if system else []
    console = Console(stderr=False, highlight=False)

    def show(result: dict[str, Any]) -> None:
        if "routing" in result:
            render(result["tokens"], result["routing"], console)

    if prompt is not None:
        result = answer(loaded, tokenizer, [*head, {"role": "user", "content": prompt}], config, stream=True,
                        show_routing=show_routing)
        show(result)
        return [result]
    if conversations is not None:
        results = []
        for messages in conversations:
            result = answer(loaded, tokenizer, [*head, *messages], config, show_routing=show_routing)
            results.append(result)
            if output is None:
                print(json.dumps(result, ensure_ascii=False), flush=True)
        if output is not None:
            atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        return results
    return _chat(loaded, tokenizer, head, config, show_routing, show)


def _chat(model, tokenizer, head, config, show_routing, show) -> list[dict[str, Any]]:
    """Read a user turn, stream the answer, keep both, until an empty line or end of input."""
    messages = list(head)
    results = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            text = input("you> " if interactive else "")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        if interactive:
            print("model> ", end="", flush=True)
        result = answer(model, tokenizer, list(messages), config, stream=True, show_routing=show_routing)
        show(result)
        messages.append({"role": "assistant", "content": result["response"]})
        results.append(result)
    return results
