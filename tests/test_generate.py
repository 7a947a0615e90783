"""``loramoe generate``: the same text as ``model.generate`` with the adapter attached, for a
prompt, a file of prompts and a chat; the routing strip; clear errors."""

from __future__ import annotations

import io
import json

import pytest
import torch

import loramoe
from loramoe import LoraConfig, LoraMoEConfig
from loramoe.cli import main as cli_main
from loramoe.data import encode_prompt
from loramoe.errors import MissingFileError, UsageError
from loramoe.generate import generate
from loramoe.models import load
from tests.conftest import save_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model = save_tiny(root / "model")
    loramoe.attach(model, LoraMoEConfig(r=2))
    torch.manual_seed(0)
    for _, layer in loramoe.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.3)
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    loramoe.save_adapter(model, root / "adapter")
    return root


def _expected(run, prompts, max_new_tokens=6):
    """What transformers' own generate gives with the adapter attached, greedily."""
    model, tokenizer = load(str(run / "model"))
    loramoe.load_adapter(model, run / "adapter")
    model.eval()
    texts = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt([{"role": "user", "content": prompt}], tokenizer)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        end = new.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in new else len(new)
        texts.append(tokenizer.decode(new[:end], skip_special_tokens=True))
    return texts


PROMPTS = ["w5 w6 w7", "w20 w3", "w40 w41 w42 w43"]


def test_a_prompt_file_gives_what_model_generate_gives(run, tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join([PROMPTS[0], json.dumps({"prompt": PROMPTS[1]}), "", PROMPTS[2]]) + "\n")
    generate(model=str(run / "model"), adapter=run / "adapter", prompts=file, output=tmp_path / "out.jsonl",
             max_new_tokens=6)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["response"] for row in rows] == _expected(run, PROMPTS)
    assert [row["messages"][-1]["content"] for row in rows] == PROMPTS


def test_a_prompt_argument_streams_its_answer(run, capsys):
    cli_main(["generate", PROMPTS[0], "--model", str(run / "model"), "--adapter", str(run / "adapter"),
              "--max-new-tokens", "6"])
    assert capsys.readouterr().out.strip() == _expected(run, PROMPTS[:1])[0].strip()


def test_show_routing_gives_each_tokens_group_shares(run, capsys):
    results = generate(model=str(run / "model"), adapter=run / "adapter", prompt=PROMPTS[2], max_new_tokens=6,
                       show_routing=True)
    shares, tokens = results[0]["routing"], results[0]["tokens"]
    assert len(shares) == len(tokens) > 0
    assert all(set(s) == {"knowledge", "task"} and abs(sum(s.values()) - 1) < 1e-3 for s in shares)
    lines = capsys.readouterr().out.strip().splitlines()[-len(tokens):]  # not a terminal: plain numbers
    assert all("knowledge " in line and "  task " in line and "█" not in line for line in lines)


def test_a_chat_keeps_the_conversation(run, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPTS[0]}\n{PROMPTS[1]}\n"))
    results = generate(model=str(run / "model"), adapter=run / "adapter", chat=True, max_new_tokens=4)
    assert len(results) == 2
    assert results[1]["messages"][:3] == [{"role": "user", "content": PROMPTS[0]},
                                          {"role": "assistant", "content": results[0]["response"]},
                                          {"role": "user", "content": PROMPTS[1]}]


def test_generate_refuses_what_it_cannot_do(run, tmp_path):
    with pytest.raises(UsageError, match="give one of: a prompt, --prompts FILE or --chat"):
        generate(model=str(run / "model"))
    with pytest.raises(MissingFileError, match="it holds a full model: pass it as --model"):
        generate(model=str(run / "model"), adapter=run / "model", prompt="w3")
    lora = loramoe.attach(loramoe.models.load(str(run / "model"))[0], LoraConfig(r=2))
    loramoe.save_adapter(lora, tmp_path / "lora")
    with pytest.raises(UsageError, match="--show-routing needs a LoRAMoE adapter"):
        generate(model=str(run / "model"), adapter=tmp_path / "lora", prompt="w3", show_routing=True)
