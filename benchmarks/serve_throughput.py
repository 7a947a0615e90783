"""Tokens/s of `loramoe serve` at 1, 4 and 16 concurrent clients, paired against `loramoe generate`.

    python benchmarks/serve_throughput.py                 # the embedded SmolLM2-135M, a LoRAMoE adapter
    python benchmarks/serve_throughput.py --rounds 5 --json benchmarks/results/serve_cpu.json

A real server process serves a LoRAMoE adapter (random, nonzero experts) on the embedded model;
each round sends the same 16 chat prompts (greedy, ``--max-tokens`` each) from 1, 4 and 16
concurrent clients (the official ``openai`` client, one thread per client, each client's prompts in
turn), and then answers them in this process the way ``loramoe generate --prompts`` does (one
after the other, :func:`loramoe.generate.main.answer`) on the same adapter. Greedy answers are the
same tokens either way (checked), so tokens/s compare the same work. Ratios are server over
generate within a round, their median and quartiles over rounds. The server process and this one
never compute at the same time: time it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import machine, paired_ratio, ratio_spread, write_json
from transformers import GenerationConfig

from loramoe import LoraMoEConfig, adapter_layers, attach, models, save_adapter
from loramoe.generate.main import answer, load_for_generation
from loramoe.generation import stop_token_ids

PROMPTS = [f"What is the capital of {country}? Answer in one sentence, then name one river there."
           for country in ("France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Canada",
                           "India", "Spain", "Ghana", "Nepal", "Italy", "Cuba", "Iran", "Laos")]
CLIENTS = (1, 4, 16)


def make_adapter(model_name: str, folder: Path) -> None:
    model, _ = models.load(model_name)
    attach(model, LoraMoEConfig(r=4))
    torch.manual_seed(0)
    for _, layer in adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    save_adapter(model, folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_name: str, adapter: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "loramoe.cli", "serve", "--model", model_name, "--adapter",
                               f"moe={adapter}", "--port", str(port)], env=dict(os.environ))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not answer /health within 300 s")


def through_server(client, clients: int, max_tokens: int) -> tuple[float, list[str], int]:
    """Seconds, answers and completion tokens for the prompts sent from ``clients`` threads."""
    def ask(prompt: str):
        reply = client.chat.completions.create(model="moe", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(ask, PROMPTS))
    return time.perf_counter() - start, [r[0] for r in replies], sum(r[1] for r in replies)


def through_generate(model, tokenizer, max_tokens: int) -> tuple[float, list[str]]:
    stops = stop_token_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, num_beams=1, eos_token_id=stops,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0])
    start = time.perf_counter()
    texts = [answer(model, tokenizer, [{"role": "user", "content": p}], config)["response"] for p in PROMPTS]
    return time.perf_counter() - start, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        make_adapter(args.model, adapter)
        model, tokenizer = load_for_generation(args.model, adapter)
        port = free_port()
        server = start_server(args.model, adapter, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        try:
            through_server(client, 16, 4)  # warm-up
            times: dict[str, list[float]] = {"generate": []} | {f"server_{c}": [] for c in CLIENTS}
            tokens = 0
            for _ in range(args.rounds):
                seconds, texts = through_generate(model, tokenizer, args.max_tokens)
                times["generate"].append(seconds)
                for c in CLIENTS:
                    served_seconds, served_texts, tokens = through_server(client, c, args.max_tokens)
                    if served_texts != texts:
                        raise SystemExit(f"{c} clients: the server's greedy answers differ from generate's")
                    times[f"server_{c}"].append(served_seconds)
        finally:
            server.terminate()
            server.wait(timeout=120)
    # the same greedy answers every time, so tokens/s ratios are the inverse time ratios of one round
    result = {"machine": machine(torch.device("cpu")), "prompts": len(PROMPTS), "max_tokens": args.max_tokens,
              "completion_tokens": tokens,
              "tokens_per_s_median": {name: tokens / statistics.median(t) for name, t in times.items()},
              "ratio_to_generate": {c: {"median": paired_ratio(times, "generate", f"server_{c}"),
                                        "quartiles": ratio_spread(times, f"server_{c}")["generate"]}
                                    for c in CLIENTS}}
    print(f"{'clients':>8} {'tokens/s':>9} {'x generate':>11} {'quartiles':>15}")
    print(f"{'generate':>8} {result['tokens_per_s_median']['generate']:9.1f}")
    for c in CLIENTS:
        q = result["ratio_to_generate"][c]
        print(f"{c:>8} {result['tokens_per_s_median'][f'server_{c}']:9.1f} {q['median']:11.2f} "
              f"{q['quartiles'][0]:7.2f}-{q['quartiles'][1]:.2f}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
