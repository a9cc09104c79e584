"""Answer files in the formats MT-Bench's and Arena-Hard's judges read."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from salsa.data.benchmarks import (
    ExportError,
    answer_record,
    markdown_counts,
    question_temperature,
    read_questions,
)
from salsa.data.tokens import chat_ids, prompt_ids
from salsa.stages.export import export_answers
from tests.hub_fixtures import arch_config, word_tokenizer, write_jsonl

ARENA_V01 = {"question_id": "a1b2", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": "hello"}]}
ARENA_V2 = {"uid": "u9", "category": "hard_prompt", "subcategory": "s", "prompt": "hello"}


def test_answer_records_have_the_judges_fields():
    mt = answer_record("mt_bench", {"question_id": 81, "turns": ["a", "b"]}, ["x", "y"], "m", 3)
    assert set(mt) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert mt["question_id"] == 81 and mt["choices"] == [{"index": 0, "turns": ["x", "y"]}]
    v01 = answer_record("arena_hard", ARENA_V01, ["## Title\n- item"], "m", 7)
    assert v01["question_id"] == "a1b2" and v01["choices"][0]["turns"] == [{"content": "## Title\n- item"}]
    assert v01["conv_metadata"]["token_len"] == 7 and v01["conv_metadata"]["header_count"]["h2"] == 1
    v2 = answer_record("arena_hard", ARENA_V2, ["fine"], "m", 1)
    assert v2["uid"] == "u9" and v2["model"] == "m"
    assert v2["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": {"answer": "fine"}},
    ]
    assert v2["metadata"]["token_len"] == 1
    assert mt["answer_id"] != answer_record("mt_bench", {"question_id": 81, "turns": ["a"]}, ["x"], "m", 1)["answer_id"]


def test_markdown_counts_hand_case():
    text = "# A\n## B\n1. one\n2. two\n- dash\n* star\n**bold** and __under__\n```\n# not a header\n- no\n```"
    counts = markdown_counts(text)
    assert counts["header_count"] == {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 0}
    assert counts["list_count"] == {"ordered": 2, "unordered": 2}
    assert counts["bold_count"] == {"**": 1, "__": 1}


def test_question_temperatures_follow_fastchat():
    assert question_temperature({"category": "writing"}, 0.0) == 0.7
    assert question_temperature({"category": "math"}, 0.5) == 0.0
    assert question_temperature({"category": "arena-hard-v0.1"}, 0.3) == 0.3


@pytest.mark.parametrize("template", [True, False])
def test_chat_ids_extend_prompt_ids(template):
    tok = word_tokenizer(chat_template=template, pad=True)
    one = [{"role": "user", "content": "how do i bake bread"}]
    assert chat_ids(tok, one) == prompt_ids(tok, "how do i bake bread")
    two = [*one, {"role": "assistant", "content": "mix flour"}, {"role": "user", "content": "thank you"}]
    ids = chat_ids(tok, two)
    assert ids[: len(prompt_ids(tok, "how do i bake bread")) - 1] == prompt_ids(tok, "how do i bake bread")[:-1]
    assert len(ids) > len(chat_ids(tok, one))
    # cut to 4 tokens: the oldest exchange goes first, then the text's start; BOS and the template stay
    short = chat_ids(tok, two, max_length=4)
    assert len(short) <= 4 and short[0] == tok.bos_token_id and short[-1] == ids[-1]
    assert tok.convert_tokens_to_ids("you") in short


def test_bad_question_files_fail_clearly(tmp_path):
    with pytest.raises(ExportError, match="must be one of"):
        read_questions(tmp_path / "q.jsonl", "alpaca")
    with pytest.raises(ExportError, match="question.jsonl"):
        read_questions(tmp_path / "missing.jsonl", "mt_bench")
    write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "text": "hi"}])
    with pytest.raises(ExportError, match="bad.jsonl:1"):
        read_questions(tmp_path / "bad.jsonl", "mt_bench")


def test_export_answers_writes_one_line_per_question(tmp_path):
    tok = word_tokenizer(chat_template=True, pad=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch_config("llama", len(tok), tok)).eval()
    questions = [ARENA_V01, {**ARENA_V01, "question_id": "z9", "turns": [{"content": "explain why"}]}]
    path = export_answers(model, tok, questions, "arena_hard", "tiny", tmp_path, max_new_tokens=4, batch_size=1)
    assert path == tmp_path / "arena_hard" / "model_answer" / "tiny.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [a["question_id"] for a in lines] == ["a1b2", "z9"]
    assert all(1 <= a["conv_metadata"]["token_len"] <= 4 for a in lines)
