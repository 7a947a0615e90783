"""Greedy generation on a tiny random Llama: batched with left padding equals one prompt at a time
and a plain argmax loop; the newline stop, in a token of its own or merged into one; both prompt
styles; order, determinism, and the model and tokenizer left as they were."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loramoe.data import encode_prompt
from loramoe.generation import generate, prompt_ids
from loramoe.suites.base import Example
from tests.conftest import BUILDERS, tiny_llama, tiny_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}w2 {{ m['content'] }} w3 {% endfor %}"
                 "{% if add_generation_prompt %}w4 {% endif %}")
WORDS = [f"w{i}" for i in range(20, 96)]  # no word starts with "w1": the EOS token "w1" would split it
EXAMPLES = [Example(str(n), " ".join(WORDS[3 * n:4 * n + 1])) for n in range(1, 12)]  # 2 to 12 words
MAX_NEW = 8

pytestmark = pytest.mark.usefixtures("one_thread")


def relabelled_tokenizer(strings: dict[int, str]) -> PreTrainedTokenizerFast:
    """``tiny_tokenizer`` with the tokens of some ids spelt differently (a newline, say): the model
    only sees ids, so it generates the same ids, which now decode to that text."""
    vocab = {f"w{i}": i for i in range(96)} | {"[UNK]": 96}
    vocab = {strings.get(i, word): i for word, i in vocab.items()}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="w1", pad_token="w0")


def greedy_ids(model, ids: list[int], steps: int = MAX_NEW) -> list[int]:
    """A plain argmax loop: no cache, no padding, no stop."""
    ids = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-steps:]


def until_stop(ids: list[int], model) -> list[int]:
    """The ids before the first EOS: the tokenizer's (w1) or the model's generation config's."""
    stops = {1, model.generation_config.eos_token_id}
    return ids[:next((i for i, token in enumerate(ids) if token in stops), len(ids))]


def count_forwards(model) -> list[None]:
    """A list that grows by one entry per forward of the model."""
    calls: list[None] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(None))
    return calls


@pytest.mark.parametrize("style", ["completion", "chat"])
@pytest.mark.parametrize("architecture", sorted(BUILDERS))
def test_batched_generation_equals_one_at_a_time_and_a_plain_argmax_loop(architecture, style):
    model, tokenizer = BUILDERS[architecture](), tiny_tokenizer(CHAT_TEMPLATE)
    batched = generate(model, tokenizer, EXAMPLES, style=style, max_new_tokens=MAX_NEW, batch_size=4,
                       progress=False)
    single = [generate(model, tokenizer, [example], style=style, max_new_tokens=MAX_NEW, batch_size=1,
                       progress=False)[0] for example in EXAMPLES]
    looped = [tokenizer.decode(until_stop(greedy_ids(model, prompt_ids(example, tokenizer, style)), model),
                               skip_special_tokens=True)
              for example in EXAMPLES]
    assert batched == single == looped
    assert sum(len(answer.split()) for answer in batched) > 3 * len(EXAMPLES)  # not trivially empty


def test_a_style_per_example_mixes_benchmarks_in_one_batch_with_the_same_answers():
    model, tokenizer = tiny_llama(), tiny_tokenizer(CHAT_TEMPLATE)
    styles = ["chat" if i % 3 else "completion" for i in range(len(EXAMPLES))]
    mixed = generate(model, tokenizer, EXAMPLES, style=styles, max_new_tokens=MAX_NEW, batch_size=5, progress=False)
    alone = [generate(model, tokenizer, [e], style=s, max_new_tokens=MAX_NEW, batch_size=1, progress=False)[0]
             for e, s in zip(EXAMPLES, styles)]
    assert mixed == alone
    with pytest.raises(ValueError, match="2 prompt styles for 11 examples"):
        generate(model, tokenizer, EXAMPLES, style=["chat", "chat"], progress=False)


def test_batches_keep_long_prompts_from_padding_short_ones():
    from loramoe.generation import _batches

    lengths = [150] * 12 + [40] * 36
    batches = _batches(lengths, 32)
    assert sorted(i for b in batches for i in b) == list(range(48))
    assert all(len(b) <= 32 and len(b) * lengths[b[0]] <= 32 * 67.5 for b in batches)
    assert all(lengths[b[0]] == max(lengths[i] for i in b) for b in batches)
    assert [len(b) for b in _batches([40] * 70, 32)] == [32, 32, 6]


def test_prompt_styles():
    chat, plain = tiny_tokenizer(CHAT_TEMPLATE), tiny_tokenizer()
    example = Example("x", "w30 w31", completion="w40 w41 w42")
    assert prompt_ids(example, chat, "chat") == [2, 30, 31, 3, 4]
    assert prompt_ids(example, plain, "chat") == encode_prompt([{"role": "user", "content": "w30 w31"}], plain)
    assert prompt_ids(example, chat, "completion") == [40, 41, 42]
    assert prompt_ids(Example("y", "w30 w31"), chat, "completion") == [30, 31]
    with pytest.raises(ValueError, match="unknown prompt style 'bogus'"):
        prompt_ids(example, chat, "bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="example 'e': its completion prompt is empty"):
        prompt_ids(Example("e", ""), chat, "completion")
    model = tiny_llama()
    answers = {style: generate(model, chat, EXAMPLES, style=style, max_new_tokens=MAX_NEW, progress=False)
               for style in ("completion", "chat")}
    assert answers["completion"] != answers["chat"]


def find_prompt(position: int, unique_in: slice) -> tuple[Example, list[int]]:
    """The first example whose greedy continuation has no EOS or pad, and whose token at
    ``position`` is neither in its prompt (respelling it would change the prompt) nor elsewhere in
    ``ids[unique_in]``."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    for example in EXAMPLES:
        prompt = prompt_ids(example, tokenizer, "completion")
        ids = greedy_ids(model, prompt)
        if not {0, 1, 2} & set(ids) and ids[position] not in prompt + ids[unique_in]:
            return example, ids
    raise AssertionError("no example fits; the tiny model changed")


@pytest.mark.parametrize("newline, kept", [("\n", []), ("end\nnext", ["end"])])
def test_generation_stops_at_the_first_newline_of_the_answer(newline, kept):
    # the third new token, spelt as a newline (alone, or merged with text on both sides)
    example, ids = find_prompt(2, slice(0, 2))
    tokenizer = relabelled_tokenizer({ids[2]: newline})
    model = tiny_llama()
    forwards = count_forwards(model)
    answer = generate(model, tokenizer, [example], style="completion", max_new_tokens=MAX_NEW, progress=False)
    assert answer == [" ".join([f"w{i}" for i in ids[:2]] + kept)]
    assert len(forwards) == 3  # the prompt, then one per new token: generation stopped, not only the text
    forwards.clear()
    [whole] = generate(model, tokenizer, [example], style="completion", max_new_tokens=MAX_NEW,
                       stop_on_newline=False, progress=False)
    assert newline in whole and len(forwards) == MAX_NEW


def test_a_newline_before_any_text_does_not_stop():
    example, ids = find_prompt(0, slice(1, None))
    model = tiny_llama()
    forwards = count_forwards(model)
    answer = generate(model, relabelled_tokenizer({ids[0]: "\n"}), [example], style="completion",
                      max_new_tokens=MAX_NEW, progress=False)
    assert answer == [" ".join(f"w{i}" for i in ids[1:])] and len(forwards) == MAX_NEW


def test_order_determinism_and_state_are_kept():
    model, tokenizer = tiny_llama().train(), tiny_tokenizer()
    padding_side = tokenizer.padding_side
    answers = generate(model, tokenizer, EXAMPLES, style="completion", max_new_tokens=MAX_NEW, batch_size=3,
                       progress=False)
    assert model.training and tokenizer.padding_side == padding_side
    again = generate(model, tokenizer, EXAMPLES, style="completion", max_new_tokens=MAX_NEW, batch_size=3,
                     progress=False)
    backwards = generate(model, tokenizer, EXAMPLES[::-1], style="completion", max_new_tokens=MAX_NEW,
                         batch_size=5, progress=False)
    assert answers == again == backwards[::-1]
    assert len(set(answers)) > 1
