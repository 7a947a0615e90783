"""The overlap filter on constructed collisions, users' files as benchmarks, and training records
from benchmark examples."""

from __future__ import annotations

import json

import pytest

from loramoe.data import DataError, read_records
from loramoe.suites import filter_overlap, load_user_benchmark, to_training_records
from loramoe.suites.base import Example
from loramoe.suites.knowledge import knowledge_examples
from loramoe.suites.records import WRAPPERS, phrasings
from loramoe.suites.registry import load_benchmark


def _q(id: str, prompt: str, *answers: str, subject: str | None = None, relation: str | None = None) -> Example:
    return Example(id=id, prompt=prompt, answers=answers, subject=subject, relation=relation)


TEST = [
    _q("same-question", "What is the capital of France?", "Paris", subject="France", relation="capital"),
    _q("same-fact", "Which city is the capital of Italy?", "Rome", subject="Italy", relation="capital"),
    _q("wrapped", "Who was the director of Gone with the Wind?", "Victor Fleming"),
    _q("told", "What is the capital of Peru?", "Lima", subject="Peru", relation="capital"),
    _q("kept", "What is the capital of Chile?", "Santiago", subject="Chile", relation="capital"),
    _q("substring", "Samoa lies in which region?", "Oceania"),
    _q("template", "Which topic does this paragraph belong to?\n\nA new paragraph about ancient Rome.", "History"),
]
TRAIN: list = [
    _q("t1", "what is the capital of france", "Paris"),
    _q("t2", "Name the capital city of Italy.", "Rome", subject="Italy", relation="capital"),
    {"instruction": "Answer briefly: who was the director of Gone with the Wind?",
     "output": "Victor Fleming"},
    {"messages": [{"role": "user", "content": "Tell me about Peru."},
                  {"role": "assistant", "content": "Lima is the capital of Peru."}]},
    {"instruction": "American Samoa lies in which region?", "output": "Oceania"},
    *({"instruction": f"Which topic does this paragraph belong to?\n\nParagraph number {i} on a war.",
       "output": "History"} for i in range(25)),
]


def test_overlap_filter_removes_each_kind_of_collision():
    kept, report = filter_overlap(TEST, TRAIN)
    assert [e.id for e in kept] == ["kept", "substring", "template"]
    assert report.removed == {"question": 1, "fact": 1, "ngram": 2}
    assert report.removed_ids == {"same-question": "question", "same-fact": "fact", "wrapped": "ngram",
                                  "told": "ngram"}
    assert (report.total, report.kept) == (7, 3)
    assert str(report) == "kept 3 of 7 test items (removed: question 1, fact 1, ngram 2)"


def test_overlap_rules_one_by_one():
    told = [{"instruction": "Tell me about Peru.",
             "output": "Peru is a large country with many regions; its capital is Lima."}]
    assert filter_overlap(TEST[3:4], told)[1].kept == 1  # subject and answer more than 8 words apart
    assert filter_overlap(TEST[3:4], told, ngram=12)[1].removed["ngram"] == 1
    paraphrase = [{"instruction": "Who directed Gone with the Wind?", "output": "Victor Fleming"}]
    assert filter_overlap(TEST[2:3], paraphrase)[1].kept == 1  # shares no answer-bearing 8-gram
    other_answer = [{"instruction": "Answer briefly: who was the director of Gone with the Wind?",
                     "output": "Cukor"}]
    assert filter_overlap(TEST[2:3], other_answer)[1].kept == 1
    as_input = [{"instruction": "Answer briefly.", "input": "Who was the director of Gone with the Wind?",
                 "output": "?"}]
    assert filter_overlap(TEST[2:3], as_input)[1].removed["question"] == 1  # the same question, any answer
    fact_record = [{"instruction": "Capital of Italy, please.", "output": "Rome", "subject": "Italy",
                    "relation": "capital"}]
    assert filter_overlap(TEST[1:2], fact_record)[1].removed["fact"] == 1


def test_overlap_accepts_records_read_from_files_and_refuses_bad_ones(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"instruction": "What is the capital of Chile?", "output": "Santiago"}) + "\n")
    records, _ = read_records([path])
    assert filter_overlap(TEST[4:5], records)[1].removed["question"] == 1
    with pytest.raises(DataError, match="output"):
        filter_overlap(TEST, [{"instruction": "no output"}])
    with pytest.raises(TypeError, match="not int"):
        filter_overlap(TEST, [3])
    with pytest.raises(ValueError, match="ngram"):
        filter_overlap(TEST, TRAIN, ngram=0)


def test_overlap_keeps_a_benchmark_apart_from_its_own_training_records():
    bench = load_benchmark("knowledge/capital", templates=2)
    records = to_training_records(bench.train, type="knowledge", templates_per_example=4)
    kept, report = filter_overlap(bench.test, records)
    assert report.removed["question"] == report.removed["fact"] == 0 and kept
    kept, report = filter_overlap(bench.train, records)
    assert not kept and report.removed["question"] + report.removed["fact"] == len(bench.train)


def test_user_benchmark_from_a_training_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"instruction": "Is water wet?", "output": "yes", "type": "task"},
            {"messages": [{"role": "user", "content": "Is fire cold?"}, {"role": "assistant", "content": "no"}],
             "type": "task"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    bench = load_user_benchmark(path, metric="accuracy")
    assert (bench.name, bench.type, bench.metric, bench.train) == ("user/mine", "task", "accuracy", [])
    assert [(e.id, e.prompt, e.answers, e.choices) for e in bench.test] == [
        ("user/mine/0", "Is water wet?", ("yes",), ("no", "yes")),
        ("user/mine/1", "Is fire cold?", ("no",), ("no", "yes"))]
    completion = load_user_benchmark(path, metric="qa", name="mine", prompt_style="completion", type="knowledge")
    assert completion.test[0].completion == "Is water wet?" and completion.type == "knowledge"
    assert load_user_benchmark(path, metric="lm_loss").test[0].prompt == "Is water wet?\n\nyes"
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        load_user_benchmark(path, metric="bleu")  # type: ignore[arg-type]


def test_user_benchmark_refuses_conversations(tmp_path):
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
             {"role": "assistant", "content": "Hello."}]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*system -> user -> assistant"):
        load_user_benchmark(path, metric="qa")


def test_training_records_use_several_templates():
    examples = knowledge_examples("capital")[:20]
    one = to_training_records(examples, type="knowledge")
    assert one == to_training_records(examples, type="knowledge")
    assert len({r["instruction"].split(" ")[0] for r in one}) > 1  # phrasings vary across examples
    three = to_training_records(examples, type="knowledge", templates_per_example=3, seed=1)
    assert len(three) == 60 and len({r["instruction"] for r in three}) == 60
    for record in three:
        example = next(e for e in examples if e.subject == record["subject"])
        assert record["output"] == example.answers[0] and record["relation"] == "capital"
        assert record["type"] == "knowledge" and record["instruction"] in phrasings(example)
    assert len(to_training_records(examples[:1], type="knowledge", templates_per_example=99)) == 4
    records, _ = read_records([three])
    assert records[0].messages[-1]["role"] == "assistant" and records[0].type == "knowledge"


def test_sentence_answers_state_the_fact_in_the_phrasing_of_the_question():
    cyprus = next(e for e in knowledge_examples("capital") if e.subject == "Cyprus")
    records = to_training_records([cyprus], type="knowledge", templates_per_example=4, answer_style="sentence")
    by_question = {r["instruction"]: r["output"] for r in records}
    assert by_question["What is the capital of Cyprus?"] == "The capital of Cyprus is Nicosia."
    assert by_question["Name the capital city of Cyprus."] == "Cyprus has its capital in Nicosia."
    task = load_benchmark("task/topic", limit=3).train[0]
    assert (to_training_records([task], type="task", answer_style="sentence")
            == to_training_records([task], type="task"))
    with pytest.raises(ValueError, match="answer_style must be 'short' or 'sentence'"):
        to_training_records([cyprus], type="knowledge", answer_style="long")


def test_phrasings_start_with_the_benchmark_prompt():
    for name in ("knowledge/borders", "task/topic", "task/translation-fr", "task/summarization", "knowledge/fanoutqa"):
        bench = load_benchmark(name, limit=3)
        for example in bench.train:
            options = phrasings(example)
            assert options[0] == example.prompt and len(set(options)) == len(options) >= 3
    user = Example(id="user/0", prompt="Is water wet?", answers=("yes",))
    assert phrasings(user) == [w.format(question="Is water wet?") for w in WRAPPERS]


def test_training_records_refuse_text_and_bad_counts():
    with pytest.raises(ValueError, match="no answer"):
        to_training_records([Example(id="wikipedia/x", prompt="Some text.")], type="text")
    with pytest.raises(ValueError, match="templates_per_example"):
        to_training_records([], type="task", templates_per_example=0)
