"""The tiny model's tokenizer: trained on the task, round-trips its text, saves as a Hugging Face tokenizer."""

import pytest
from transformers import AutoTokenizer

from salsa.data.synthetic import SyntheticTask
from salsa.data.tokens import prompt_ids, response_ids
from salsa.models.hf import train_word_tokenizer


def _tokenizer():
    task = SyntheticTask(0)
    texts = [f"{e.prompt} {e.response}" for e in task.sft_examples(500)] + task.pretrain_documents(200)
    return train_word_tokenizer(texts), task


def test_round_trip_and_save_load(tmp_path):
    tok, task = _tokenizer()
    for e in task.sft_examples(50):
        ids = tok(e.response, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == e.response
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "describe the fox and the owl ."
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.chat_template == tok.chat_template


def test_chat_format():
    tok, _ = _tokenizer()
    ids = prompt_ids(tok, "tell me about the fox .")
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[-1]) == "<assistant>"
    assert tok.decode(ids[1:-1]).split() == ["<user>", "tell", "me", "about", "the", "fox", "."]
    r = response_ids(tok, "the fox runs .", ended=True)
    assert r[-1] == tok.eos_token_id
    assert response_ids(tok, "the fox runs", ended=False)[-1] != tok.eos_token_id
    # truncation keeps the generation prompt at the end
    assert prompt_ids(tok, "tell me about the fox .", max_length=4)[-1] == ids[-1]


@pytest.mark.parametrize("template", [True, False])
def test_long_prompts_lose_text_not_bos_or_template(template):
    """An over-long prompt keeps BOS, the user marker and the generation prompt; the start of its text is cut."""
    from salsa.data.tokens import prompt_ids
    from tests.hub_fixtures import WORDS, word_tokenizer

    tok = word_tokenizer(chat_template=template, pad=True)
    text = " ".join(WORDS[:40])
    full = prompt_ids(tok, text)
    cut = prompt_ids(tok, text, max_length=10)
    assert len(full) > 10 and len(cut) == 10
    assert cut[0] == tok.bos_token_id == full[0]
    head = 2 if template else 1  # <bos> <user>, or <bos>
    tail = 1 if template else 0  # <assistant> (the generation prompt)
    assert cut[:head] == full[:head] and cut[len(cut) - tail :] == full[len(full) - tail :]
    text_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert cut[head : len(cut) - tail] == text_ids[-(10 - head - tail) :]  # the end of the text
    with pytest.raises(ValueError, match="no room for the text"):
        prompt_ids(tok, text, max_length=head + tail)


def test_word_tokenizer_ids_stay_inside_the_vocabulary_when_texts_hold_chat_markers():
    from salsa.models.hf import train_word_tokenizer

    plain = train_word_tokenizer(["the fox is red .", "the rain falls ."])
    chat = train_word_tokenizer(["<user> the fox is red . <assistant> the rain falls ."])
    assert max(chat.get_vocab().values()) == len(chat) - 1 and chat.get_vocab() == plain.get_vocab()
    ids = chat("<user> the fox <assistant> red", add_special_tokens=False)["input_ids"]
    assert chat.convert_ids_to_tokens(ids) == ["<user>", "the", "fox", "<assistant>", "red"]
