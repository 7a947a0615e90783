"""Instruction data: every file format, both record shapes, the loss mask, and a clear error (file,
line, field) for every kind of bad input. Tokenizers are tiny word-level ones built here."""

from __future__ import annotations

import json
import re
import warnings

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loramoe.data import IGNORE_INDEX, PLAIN_TEMPLATE, DataCollator, DataError, Record, read_records, tokenize_records

WORDS = ["[UNK]", "[PAD]", "</s>", "###", "Instruction", "Response", "System", ":", "<", ">", "user", "assistant",
         "system", "bot", "what", "is", "the", "capital", "of", "France", "Peru", "Paris", "Lima", "be", "brief", "a",
         "b", "c", "d", "e"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
RECORDS = [
    {"instruction": "what is the capital of France", "output": "Paris", "type": "knowledge"},
    {"instruction": "what is the capital of Peru", "input": "be brief", "output": "Lima"},
]
EXPECTED = [
    Record([{"role": "user", "content": "what is the capital of France"},
            {"role": "assistant", "content": "Paris"}], "knowledge", ""),
    Record([{"role": "user", "content": "what is the capital of Peru\n\nbe brief"},
            {"role": "assistant", "content": "Lima"}], None, ""),
]


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>",
                                        pad_token="[PAD]")
    tokenizer.chat_template = chat_template
    return tokenizer


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))


def labelled(tokenizer, sample) -> list[str]:
    return tokens(tokenizer, [label for label in sample["labels"] if label != IGNORE_INDEX])


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def at(path) -> str:
    """A path as the start of an error-message regex."""
    return re.escape(str(path))


def without_source(records: list[Record]) -> list[Record]:
    return [Record(r.messages, r.type, "") for r in records]


# --- reading ---------------------------------------------------------------------------------------

def test_jsonl_records_and_their_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", f"{json.dumps(RECORDS[0])}\n\n  \n{json.dumps(RECORDS[1])}\n")
    records, skipped = read_records([path])
    assert without_source(records) == EXPECTED and skipped == 0
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4"]  # blank lines still count


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_a_json_array_is_indexed_by_record(tmp_path, name):
    path = write(tmp_path / name, "\ufeff" + json.dumps(RECORDS, indent=2))  # a BOM is tolerated
    records, _ = read_records([path])
    assert without_source(records) == EXPECTED
    assert [r.source for r in records] == [f"{path}[0]", f"{path}[1]"]


def test_a_json_file_may_hold_json_lines(tmp_path):
    path = write(tmp_path / "d.json", "\n".join(json.dumps(r) for r in RECORDS))
    assert without_source(read_records([path])[0]) == EXPECTED


def test_csv_cells_are_text_and_empty_cells_are_absent(tmp_path):
    path = write(tmp_path / "d.csv", "instruction,input,output,type\n"
                                     '"what is\nthe capital of France",,Paris,knowledge\n'
                                     "\n"
                                     "a,NA,001,\n"
                                     "b,,None,\n"
                                     "c,,2020-01-01,\n")
    records, _ = read_records([path])
    assert [r.source for r in records] == [f"{path}:{n}" for n in (2, 5, 6, 7)]  # the quoted cell spans 2 lines
    assert records[0].messages[0]["content"] == "what is\nthe capital of France"
    assert records[0].type == "knowledge" and records[1].type is None
    assert records[1].messages == [{"role": "user", "content": "a\n\nNA"},
                                   {"role": "assistant", "content": "001"}]
    assert [r.messages[1]["content"] for r in records[2:]] == ["None", "2020-01-01"]


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame(RECORDS).to_parquet(path)  # the missing 'input' and 'type' are nulls here
    records, _ = read_records([path])
    assert without_source(records) == EXPECTED
    assert [r.source for r in records] == [f"{path}[0]", f"{path}[1]"]


def test_parquet_messages(tmp_path):
    path = tmp_path / "m.parquet"
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    pd.DataFrame({"messages": [chat], "type": ["task"]}).to_parquet(path)
    assert read_records([path])[0] == [Record(chat, "task", f"{path}[0]")]


def test_lists_and_files_in_order_and_messages_kept(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "name": "ignored"}]
    path = write(tmp_path / "d.jsonl", json.dumps(RECORDS[1]) + "\n")
    records, _ = read_records([[RECORDS[0]], path, [{"messages": chat, "type": None}]])
    assert [r.source for r in records] == ["<list>[0]", f"{path}:1", "<list>[0]"]
    assert records[2].messages == [{"role": m["role"], "content": m["content"]} for m in chat]
    assert records[2].type is None


def test_sources_must_be_a_list_of_paths_or_lists(tmp_path):
    with pytest.raises(TypeError, match="in a list"):
        read_records(str(tmp_path / "d.jsonl"))
    with pytest.raises(TypeError, match="not dict"):
        read_records([RECORDS[0]])


# --- bad input -------------------------------------------------------------------------------------

GOOD = json.dumps(RECORDS[0])
BAD_JSONL = [  # (second line of the file, what the error must say after "d.jsonl:3: ")
    ('{"instruction": "a", output}', r"invalid JSON: Expecting property name .*\(column 22\)"),
    ('{"instruction": "a"}', r"field 'output' is missing"),
    ('{"instruction": "a", "output": null}', r"field 'output' is missing"),
    ('{"output": "a"}', r"field 'instruction' is missing"),
    ('{"instruction": "a", "output": 3}', r"field 'output' must be a string, found int"),
    ('{"instruction": ["a"], "output": "b"}', r"field 'instruction' must be a string, found list"),
    ('{"instruction": "a", "input": 1.5, "output": "b"}', r"field 'input' must be a string, found float"),
    ('{"instruction": "a", "output": "b", "type": 2}', r"field 'type' must be a string, found int"),
    ('{"prompt": "a", "completion": "b"}', (r"a record needs fields 'instruction' and 'output', or 'messages' "
                                           r"\(found: prompt, completion\)")),
    ('{"messages": [{"role": "user", "content": "a"}], "output": "b"}',
     r"field 'messages' and field 'output' in one record"),
    ('{"messages": "a"}', r"field 'messages' must be a non-empty list of messages, found str"),
    ('{"messages": []}', r"field 'messages' must be a non-empty list of messages, found an empty list"),
    ('{"messages": ["a"]}', r"field 'messages\[0\]' must be an object"),
    ('{"messages": [{"role": "user"}]}', r"field 'messages\[0\].content' is missing"),
    ('{"messages": [{"role": "user", "content": 1}]}',
     r"field 'messages\[0\].content' must be a string, found int"),
    ('{"messages": [{"role": 1, "content": "a"}]}', r"field 'messages\[0\].role' must be a string, found int"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     r"field 'messages\[1\].role' is 'bot', expected 'assistant'"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', (r"field 'messages\[0\].role' is 'assistant', "
                                                              r"expected 'user'")),
    ('{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}',
     r"field 'messages' must end with the assistant's response, not a 'user' message"),
    ("[1, 2]", r"a record must be an object, found list"),
]


@pytest.mark.parametrize("line,message", BAD_JSONL)
def test_bad_jsonl_records_name_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path / "d.jsonl", f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(DataError, match=f"^{at(path)}:3: {message}"):
        read_records([path])


def test_bad_records_in_lists_arrays_and_parquet_name_their_index(tmp_path):
    with pytest.raises(DataError, match=r"^<list>\[1\]: field 'output' is missing"):
        read_records([[RECORDS[0], {"instruction": "a"}]])
    path = write(tmp_path / "d.json", json.dumps([RECORDS[0], {"instruction": "a", "output": 5}]))
    with pytest.raises(DataError, match=rf"^{at(path)}\[1\]: field 'output' must be a string, found int"):
        read_records([path])
    path = tmp_path / "d.parquet"
    pd.DataFrame({"instruction": ["a", "b"], "output": ["x", None]}).to_parquet(path)
    with pytest.raises(DataError, match=rf"^{at(path)}\[1\]: field 'output' is missing"):
        read_records([path])


def test_a_broken_json_array_names_the_line_even_with_skip_bad(tmp_path):
    path = write(tmp_path / "d.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",, }\n]')
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=rf"^{at(path)}:3: invalid JSON: Expecting .*\(column 23\)"):
            read_records([path], skip_bad=skip_bad)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(DataError, match=rf"^{at(path)}:2: invalid JSON: .*utf-8"):
        read_records([path])
    path = tmp_path / "d.csv"
    path.write_bytes(b"instruction,output\na,\xff\n")
    with pytest.raises(DataError, match=rf"^{at(path)}: not UTF-8 text: invalid start byte"):
        read_records([path])


@pytest.mark.parametrize("text,message", [
    ("instruction,output\na,b\nc\n", r":3: expected 2 fields \(as the header\), found 1"),
    ("instruction,output\na,b\nc,d,e\n", r":3: expected 2 fields \(as the header\), found 3"),
    ("instruction,output\na,b\nc,\n", r":3: field 'output' is missing"),
    ('instruction,output\na,b\nc,"d\ne,f\n', r":3: invalid CSV: unexpected end of data"),
    ('instruction,output\na,b\n"c"d,e\n', r":3: invalid CSV: ',' expected after '\"'"),
    ("messages,type\na,b\n", r":2: field 'messages' must be a non-empty list of messages, found str"),
])
def test_bad_csv_names_the_line(tmp_path, text, message):
    path = write(tmp_path / "d.csv", text)
    with pytest.raises(DataError, match=f"^{at(path)}{message}"):
        read_records([path])


@pytest.mark.parametrize("name,content", [("d.jsonl", ""), ("d.jsonl", "\n  \n"), ("d.json", "[]"),
                                          ("d.csv", ""), ("d.csv", "instruction,output\n")])
def test_an_empty_file_is_an_error(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=rf"^{at(path)}: no records \(it is empty\)"):
        read_records([path], skip_bad=True)


def test_empty_list_empty_parquet_missing_file_unknown_extension_and_corrupt_parquet(tmp_path):
    with pytest.raises(DataError, match=r"^<list>: no records"):
        read_records([[]])
    path = tmp_path / "e.parquet"
    pd.DataFrame({"instruction": pd.Series([], dtype=str), "output": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(DataError, match=rf"^{at(path)}: no records"):
        read_records([path])
    with pytest.raises(DataError, match=rf"^{at(tmp_path / 'nope.jsonl')}: no such file"):
        read_records([tmp_path / "nope.jsonl"])
    unknown = r"d\.txt: unknown file type '\.txt'; use \.jsonl, \.json, \.csv or \.parquet"
    with pytest.raises(DataError, match=unknown):
        read_records([write(tmp_path / "d.txt", GOOD)])
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read Parquet"):
        read_records([write(tmp_path / "bad.parquet", "not parquet")])


def test_skip_bad_counts_and_warns_per_file(tmp_path):
    first = write(tmp_path / "a.jsonl", f"{GOOD}\nnot json\n{{\"instruction\": \"a\"}}\n{GOOD}\n")
    second = write(tmp_path / "b.csv", "instruction,output\na,b\nc\n")
    with pytest.warns(UserWarning) as caught:
        records, skipped = read_records([first, second, RECORDS], skip_bad=True)
    assert skipped == 3 and [r.source for r in records] == [f"{first}:1", f"{first}:4", f"{second}:2",
                                                            "<list>[0]", "<list>[1]"]
    messages = [str(w.message) for w in caught]
    assert messages == [(f"{first}: skipped 2 bad record(s) of 4; the first: {first}:2: invalid JSON: "
                        f"Expecting value (column 1)"),
                        (f"{second}: skipped 1 bad record(s) of 2; the first: {second}:3: expected 2 fields "
                        f"(as the header), found 1")]


def test_skip_bad_with_nothing_good_left_is_an_error(tmp_path):
    path = write(tmp_path / "d.jsonl", 'nope\n{"output": "a"}\n')
    message = rf"^{at(path)}: no records \(all 2 are bad; the first: {at(path)}:1: invalid JSON"
    with pytest.raises(DataError, match=message):
        read_records([path], skip_bad=True)


# --- tokenizing ------------------------------------------------------------------------------------

def test_plain_template_labels_exactly_the_response_and_eos():
    tokenizer = make_tokenizer()
    records, _ = read_records([RECORDS])
    data = tokenize_records(records, tokenizer, max_length=64)
    assert data.column_names == ["input_ids", "attention_mask", "labels", "sample_type", "content_start"]
    sample = data[0]
    prompt = tokenizer(PLAIN_TEMPLATE.format(instruction="what is the capital of France"))["input_ids"]
    opening = tokenizer(PLAIN_TEMPLATE.format(instruction=""))["input_ids"]
    start = next(i for i, (a, b) in enumerate(zip(prompt, opening)) if a != b)
    assert start > 0 and sample["content_start"] == start  # the record's own words start there
    assert sample["input_ids"] == prompt + tokenizer("Paris")["input_ids"] + [tokenizer.eos_token_id]
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + sample["input_ids"][len(prompt):]
    assert sample["attention_mask"] == [1] * len(sample["input_ids"])
    assert labelled(tokenizer, sample) == ["Paris", "</s>"]
    assert tokens(tokenizer, data[1]["input_ids"]) == [  # the input joins the instruction after a blank line
        "###", "Instruction", ":", "what", "is", "the", "capital", "of", "Peru", "be", "brief",
        "###", "Response", ":", "Lima", "</s>"]


def test_plain_template_multi_turn_counts_only_the_last_answer():
    tokenizer = make_tokenizer()
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    sample = tokenize_records(read_records([[{"messages": chat}]])[0], tokenizer, max_length=64)[0]
    assert tokens(tokenizer, sample["input_ids"]) == [
        "###", "System", ":", "be", "brief", "###", "Instruction", ":", "a", "###", "Response", ":", "b",
        "###", "Instruction", ":", "c", "###", "Response", ":", "d", "</s>"]
    assert labelled(tokenizer, sample) == ["d", "</s>"]


def test_chat_template_labels_the_response_and_the_end_of_turn():
    tokenizer = make_tokenizer(CHAT_TEMPLATE)
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d e"}]
    sample = tokenize_records(read_records([[{"messages": chat}]])[0], tokenizer, max_length=64)[0]
    assert tokens(tokenizer, sample["input_ids"]) == [
        "<", "user", ">", "a", "</s>", "<", "assistant", ">", "b", "</s>",
        "<", "user", ">", "c", "</s>", "<", "assistant", ">", "d", "e", "</s>"]
    assert labelled(tokenizer, sample) == ["d", "e", "</s>"]


def test_chat_template_that_renders_history_differently_falls_back_to_prompt_response_eos():
    # the generation prompt says <assistant>, the rendered conversation <bot>: not a prefix
    template = CHAT_TEMPLATE.replace("<{{ m.role }}>", "<{{ 'bot' if m.role == 'assistant' else m.role }}>")
    tokenizer = make_tokenizer(template)
    sample = tokenize_records(read_records([RECORDS[:1]])[0], tokenizer, max_length=64)[0]
    assert tokens(tokenizer, sample["input_ids"]) == [
        "<", "user", ">", "what", "is", "the", "capital", "of", "France", "</s>", "<", "assistant", ">",
        "Paris", "</s>"]
    assert labelled(tokenizer, sample) == ["Paris", "</s>"]


@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE])
def test_truncation_keeps_the_start_and_warns_once_with_the_count(chat_template):
    tokenizer = make_tokenizer(chat_template)
    long = {"instruction": "a", "output": " ".join(["b"] * 30)}
    records, _ = read_records([[RECORDS[0], long, long, {"instruction": "c " * 40, "output": "d"}]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = tokenize_records(records, tokenizer, max_length=20)
    assert [str(w.message) for w in caught] == [
        ("3 of 4 samples are longer than max_length=20 tokens and were truncated, keeping the start; "
        "1 of them kept nothing of the response and were dropped (nothing to learn)")]
    full = tokenize_records(records, tokenizer, max_length=1000)
    assert len(data) == 3  # the one whose prompt fills max_length is dropped
    for cut, whole in zip(data, full):
        assert cut["input_ids"] == whole["input_ids"][:20] and cut["labels"] == whole["labels"][:20]
    assert labelled(tokenizer, data[1]) and set(labelled(tokenizer, data[1])) == {"b"}
    assert all(set(row["labels"]) != {IGNORE_INDEX} for row in data)
    assert len(data[0]["input_ids"]) < 20  # short samples untouched
    with pytest.raises(DataError, match="every sample's prompt fills max_length=20"):
        tokenize_records(records[3:], tokenizer, max_length=20)


def test_no_warning_when_nothing_is_truncated():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_records(read_records([RECORDS])[0], make_tokenizer(), max_length=64)


def test_sample_types_and_required_types():
    records, _ = read_records([[*RECORDS, {**RECORDS[0], "type": "task"}, {**RECORDS[0], "type": "chat"}]])
    data = tokenize_records(records, make_tokenizer(), max_length=64, type_ids={"knowledge": 0, "task": 1})
    assert data["sample_type"] == [0, -1, 1, -1]
    with pytest.raises(DataError, match=r"^<list>\[1\]: field 'type' is missing; known types: knowledge, task"):
        tokenize_records(records, make_tokenizer(), max_length=64, type_ids={"knowledge": 0, "task": 1},
                         require_types=True)
    with pytest.raises(DataError, match=r"^<list>\[3\]: field 'type' is 'chat', which no expert group claims; "
                                        r"known types: knowledge, task"):
        tokenize_records([records[0], records[3]], make_tokenizer(), max_length=64,
                         type_ids={"task": 1, "knowledge": 0}, require_types=True)


def test_a_tokenizer_without_eos_is_refused_on_the_plain_path():
    tokenizer = make_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize_records(read_records([RECORDS])[0], tokenizer, max_length=64)


# --- batching --------------------------------------------------------------------------------------

def test_collator_pads_right_with_pad_zero_and_ignore():
    tokenizer = make_tokenizer()
    data = tokenize_records(read_records([RECORDS])[0], tokenizer, max_length=64, type_ids={"knowledge": 3})
    first, second = data[0], data[1]
    assert (len(first["input_ids"]), len(second["input_ids"])) == (14, 16)
    batch = DataCollator(tokenizer)([first, second])
    assert {key: (tuple(t.shape), t.dtype) for key, t in batch.items()} == {
        "input_ids": ((2, 16), torch.long), "attention_mask": ((2, 16), torch.long),
        "labels": ((2, 16), torch.long), "sample_type": ((2,), torch.long), "content_start": ((2,), torch.long)}
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [first["input_ids"] + [pad, pad], second["input_ids"]]
    assert batch["attention_mask"].tolist() == [[1] * 14 + [0, 0], [1] * 16]
    assert batch["labels"].tolist() == [first["labels"] + [IGNORE_INDEX] * 2, second["labels"]]
    assert batch["sample_type"].tolist() == [3, -1]
    assert batch["content_start"].tolist() == [first["content_start"], second["content_start"]]


def test_collator_pad_to_multiple_of_and_tensor_features():
    tokenizer = make_tokenizer()
    data = tokenize_records(read_records([RECORDS])[0], tokenizer, max_length=64).with_format("torch")
    batch = DataCollator(tokenizer, pad_to_multiple_of=12)([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 24)
    assert batch["attention_mask"].sum(1).tolist() == [14, 16]
    assert batch["labels"][:, 16:].eq(IGNORE_INDEX).all()


def test_collator_needs_a_pad_token():
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        DataCollator(tokenizer)
