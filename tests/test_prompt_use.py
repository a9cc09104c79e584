"""Measures of whether a model reads its prompt (`salsa.models.prompt_use`), on models whose answer is known."""

from types import SimpleNamespace

import torch
from torch import nn

from salsa.data.synthetic import SyntheticTask, requested_nouns
from salsa.models.hf import train_word_tokenizer
from salsa.models.prompt_use import answer_token_losses, mismatched, prompt_dependence


class PrefixBag(nn.Module):
    """Logits that favour every token already seen (a model that copies from its context) or, with `blind`, a
    fixed distribution (a model that reads nothing)."""

    def __init__(self, vocab: int, blind: bool = False):
        super().__init__()
        self.vocab, self.blind = vocab, blind
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if self.blind:
            return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, self.vocab).clone())
        seen = torch.nn.functional.one_hot(input_ids, self.vocab).float().cumsum(1).clamp(max=1)
        return SimpleNamespace(logits=3.0 * seen + self.bias)


def _task():
    examples = SyntheticTask(0).sft_examples(60)
    tok = train_word_tokenizer([f"{e.prompt} {e.response}" for e in examples])
    return tok, examples


def test_mismatched_moves_every_prompt_and_is_seeded():
    prompts = [f"p{i}" for i in range(7)]
    out = mismatched(prompts, seed=3)
    assert sorted(out) == prompts and all(a != b for a, b in zip(out, prompts, strict=True))
    assert out == mismatched(prompts, seed=3) and out != mismatched(prompts, seed=4)


def test_answer_token_losses_hand_case():
    tok, examples = _task()
    model = PrefixBag(len(tok))
    e = examples[0]
    (losses,) = answer_token_losses(model, tok, [e.prompt], [e.response], [e.ended], 32)
    from salsa.data.tokens import prompt_ids, response_ids

    q, r = prompt_ids(tok, e.prompt, 32), response_ids(tok, e.response, e.ended)
    ids = torch.tensor([q + r])
    logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(losses, -logp[len(q) - 1 :])
    assert len(losses) == len(r)


def test_prompt_dependence_tells_a_reader_from_a_blind_model():
    tok, examples = _task()
    reader = prompt_dependence(PrefixBag(len(tok)), tok, examples, requested_nouns, 32)
    blind = prompt_dependence(PrefixBag(len(tok), blind=True), tok, examples, requested_nouns, 32)
    # copying from the prompt predicts the asked nouns: lower loss with the own prompt than with another's
    assert reader["asked_noun_loss_own"] < reader["asked_noun_loss_mismatched"] - 0.5
    # a model that reads nothing scores the same tokens the same way whatever the prompt
    assert blind["answer_loss_own"] == blind["answer_loss_mismatched"]
    assert blind["asked_noun_loss_own"] == blind["asked_noun_loss_mismatched"]
