"""UltraFeedback and HH-RLHF as task data, from local files in the hub datasets' schemas."""

import logging

import datasets
import pytest

from salsa.data.hub import DataError, hub_data, split_transcript, text_problem
from salsa.data.tokens import prompt_ids
from tests.hub_fixtures import (
    GOOD,
    PROMPTS,
    hh_rlhf_dir,
    hh_rlhf_rows,
    ultrafeedback_dir,
    ultrafeedback_rows,
    word_tokenizer,
    write_jsonl,
)

UF, HH = "HuggingFaceH4/ultrafeedback_binarized", "Anthropic/hh-rlhf"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ultrafeedback_from_local_files(tmp_path, fmt):
    root = ultrafeedback_dir(tmp_path, n=12, fmt=fmt)
    data = hub_data("ultrafeedback", UF, path=str(root), n_sft_val=4, n_pairs_val=5, n_eval_prompts=3, n_pretrain=2)
    assert len(data.sft_train) == 12 and len(data.sft_val) == 4 and len(data.pairs_val) == 5
    assert len(data.pairs_train) == 12 and data.judge is None
    # prompts are the distinct prompts of the preference splits
    assert sorted(data.prompts_train) == sorted(PROMPTS) and len(data.prompts_eval) == 3
    pair = data.pairs_train[0]
    i = PROMPTS.index(pair.prompt)
    assert pair.chosen == GOOD[i] and pair.gold_margin is None
    assert data.sft_train[0].response in GOOD
    assert data.pretrain == [f"{e.prompt} {e.response}" for e in data.sft_train[:2]]


def test_rows_with_empty_prompt_or_long_text_are_dropped_and_counted(tmp_path, caplog):
    rows = ultrafeedback_rows(6)
    rows[0]["prompt"] = "  "
    rows[1]["messages"][-1]["content"] = "word " * 50
    rows[2]["chosen"][-1]["content"] = ""
    for split in ("train_sft", "test_sft", "train_prefs", "test_prefs"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="salsa"):
        data = hub_data("ultrafeedback", UF, path=str(tmp_path), max_response_chars=100)
    assert len(data.sft_train) == 4  # empty prompt, too-long response
    assert len(data.pairs_train) == 4  # empty prompt, empty chosen
    assert "train_sft: kept 4, dropped {'empty prompt': 1, 'response too long': 1}" in caplog.text
    assert "train_prefs: kept 4, dropped {'empty prompt': 1, 'empty response': 1}" in caplog.text


def test_text_problem_hand_cases():
    assert text_problem("q", ["a"], 5, 5) is None
    assert text_problem("", ["a"], 5, 5) == "empty prompt"
    assert text_problem("q", ["a", " "], 5, 5) == "empty response"
    assert text_problem("question", ["a"], 5, 5) == "prompt too long"
    assert text_problem("q", ["answer"], 5, 5) == "response too long"


def test_missing_column_fails_clearly(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "messages"} for r in ultrafeedback_rows(3)]
    for split in ("train_sft", "test_sft", "train_prefs", "test_prefs"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    with pytest.raises(DataError, match="has no column 'messages'"):
        hub_data("ultrafeedback", UF, path=str(tmp_path))
    with pytest.raises(DataError, match="no file for split 'train'"):
        hub_data("hh_rlhf", HH, path=str(tmp_path))


def test_hub_path_asks_datasets_for_the_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(hh_rlhf_rows(4))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = hub_data("hh_rlhf", HH)
    assert calls == [("Anthropic/hh-rlhf", "train"), ("Anthropic/hh-rlhf", "test")]
    assert len(data.pairs_train) == 4


def test_split_transcript():
    single = "\n\nHuman: how do i bake bread\n\nAssistant: mix flour and water"
    assert split_transcript(single) == ("how do i bake bread", "mix flour and water")
    multi = "\n\nHuman: hello\n\nAssistant: hi\n\nHuman: help me\n\nAssistant: sure"
    assert split_transcript(multi) == ("Human: hello\n\nAssistant: hi\n\nHuman: help me", "sure")
    with pytest.raises(DataError, match="no 'Assistant:' turn"):
        split_transcript("\n\nHuman: hello")


def test_hh_rlhf_pairs_share_the_dialogue(tmp_path, caplog):
    root = hh_rlhf_dir(tmp_path, n=8, fmt="parquet")
    data = hub_data("hh_rlhf", HH, path=str(root))
    assert len(data.pairs_train) == 8 and len(data.sft_train) == 8
    assert all(p.chosen in GOOD for p in data.pairs_train)
    assert any(p.prompt.startswith("Human: hello") for p in data.pairs_train)  # multi-turn history kept
    rows = hh_rlhf_rows(4)
    rows[0]["rejected"] = "\n\nHuman: something else\n\nAssistant: no"
    write_jsonl(tmp_path / "mixed" / "train.jsonl", rows)
    write_jsonl(tmp_path / "mixed" / "test.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="salsa"):
        data = hub_data("hh_rlhf", HH, path=str(tmp_path / "mixed"))
    assert len(data.pairs_train) == 3 and "'different prompts': 1" in caplog.text


def test_prompts_use_the_chat_template_when_there_is_one():
    with_template = word_tokenizer(chat_template=True, pad=True)
    ids = prompt_ids(with_template, "how do i bake bread")
    expected = with_template.apply_chat_template(
        [{"role": "user", "content": "how do i bake bread"}], add_generation_prompt=True, return_dict=False
    )
    assert ids == list(expected) and ids[-1] == with_template.convert_tokens_to_ids("<assistant>")
    plain = word_tokenizer(chat_template=False, pad=False)
    assert prompt_ids(plain, "how do i bake bread")[0] == plain.bos_token_id
