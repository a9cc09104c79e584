"""The embedded task: the gold reward's properties on hand-made responses, and the generator's guarantees."""

import math
import statistics

import pytest

from salsa.data.synthetic import (
    GOLD_WEIGHTS,
    SyntheticTask,
    gold_components,
    gold_reward,
    is_well_formed,
    sentence_polarity,
    vocabulary,
)

PROMPT = "describe the fox and the owl ."


def test_covering_the_requested_nouns_scores_higher():
    both = "the fox is good . the owl is good ."
    one = "the fox is good . the deer is good ."
    assert gold_components(PROMPT, both)["coverage"] == 1.0
    assert gold_components(PROMPT, one)["coverage"] == 0.5
    assert gold_reward(PROMPT, both) - gold_reward(PROMPT, one) == pytest.approx(0.5 * GOLD_WEIGHTS["coverage"])


def test_off_topic_sentences_cost_relevance():
    on = "the fox is good . the wolf runs ."
    off = "the fox is good . the comet spins ."
    assert gold_components(PROMPT, on)["relevance"] == 1.0
    assert gold_components(PROMPT, off)["relevance"] == 0.0  # (1 on - 1 off) / 2
    assert gold_reward(PROMPT, on) > gold_reward(PROMPT, off)


def test_negation_flips_sentiment_and_intensifier_scales_it():
    assert sentence_polarity(["the", "fox", "is", "not", "bad"]) == 1.0
    assert sentence_polarity(["the", "fox", "is", "not", "good"]) == -1.0
    assert sentence_polarity(["the", "fox", "is", "very", "good"]) == 1.5
    assert gold_reward(PROMPT, "the fox is not bad .") > gold_reward(PROMPT, "the fox is bad .")
    c = gold_components(PROMPT, "the fox is good . the owl is great .")
    assert c["sentiment"] == pytest.approx(math.tanh(1.0))


def test_ending_properly():
    text = "the fox is good . the owl is fine ."
    assert gold_components(PROMPT, text, ended=True)["ending"] == 1.0
    assert gold_components(PROMPT, text, ended=False)["ending"] == -1.0  # cut off by the length limit
    assert gold_components(PROMPT, "the fox is good . the owl", ended=True)["ending"] == -1.0  # stopped mid-sentence
    assert gold_reward(PROMPT, text, True) - gold_reward(PROMPT, text, False) == pytest.approx(
        2 * GOLD_WEIGHTS["ending"]
    )


def test_repetition_is_penalised():
    distinct = "the fox is good . the owl is fine ."
    repeated = "the fox is good . the fox is good ."
    stutter = "the fox is is good . the owl is fine ."
    assert gold_components(PROMPT, repeated)["repetition"] == 0.5
    assert gold_components(PROMPT, stutter)["repetition"] == pytest.approx(1 / 11)
    assert gold_reward(PROMPT, repeated) < gold_reward(PROMPT, distinct)
    assert gold_reward(PROMPT, stutter) < gold_reward(PROMPT, distinct)


def test_length_has_diminishing_returns():
    sentences = ["the fox runs .", "the owl hunts .", "a fox hides .", "the owl sleeps .", "a big fox jumps ."]
    rewards = [gold_reward(PROMPT, " ".join(sentences[:k])) for k in range(1, 6)]
    gains = [b - a for a, b in zip(rewards, rewards[1:], strict=False)]
    assert all(g > 0 for g in gains)
    assert all(g2 < g1 for g1, g2 in zip(gains, gains[1:], strict=False))


def test_grammar():
    assert is_well_formed(["the", "fox", "is", "not", "very", "good"])
    assert is_well_formed(["i", "think", "a", "big", "owl", "hunts", "near", "the", "fox"])
    assert is_well_formed(["it", "is", "fine"])
    assert not is_well_formed(["fox", "the", "good", "is"])
    assert gold_components(PROMPT, "fox the good is . the owl runs .")["grammar"] == 0.5
    assert gold_reward(PROMPT, "fox the good is .") < gold_reward(PROMPT, "the fox is good .")


def test_generator_is_seeded_and_streams_are_independent():
    a, b = SyntheticTask(3), SyntheticTask(3)
    assert a.sft_examples(20) == b.sft_examples(20)
    assert a.prompts(10, "eval") == b.prompts(10, "eval")
    assert a.sft_examples(5) != SyntheticTask(4).sft_examples(5)
    # asking for more pairs does not change the first ones
    assert a.preference_pairs(30, "train")[:10] == b.preference_pairs(10, "train")
    assert a.prompts(10, "eval") != a.prompts(10, "train")


def test_corpus_is_mixed_quality_and_labels_are_noisy():
    task = SyntheticTask(0)
    rewards = [gold_reward(e.prompt, e.response, e.ended) for e in task.sft_examples(1000)]
    best = "the fox is very lovely . the owl is great . i think the fox is wonderful . the owl runs near the fox ."
    # SFT data sits well below what is attainable, with a wide spread
    assert statistics.mean(rewards) < gold_reward(PROMPT, best) - 2.0
    assert statistics.pstdev(rewards) > 1.0
    pairs = task.preference_pairs(1000, "train")
    agree = sum(p.gold_margin > 0 for p in pairs) / len(pairs)
    assert 0.65 < agree < 0.95  # raters follow the gold reward, with Bradley–Terry noise


def test_every_generated_word_is_in_the_vocabulary():
    vocab = set(vocabulary())
    task = SyntheticTask(1)
    words = {w for e in task.sft_examples(300) for w in (e.prompt + " " + e.response).split()}
    assert words <= vocab
    assert 150 < len(vocab) < 400


def test_chat_pretraining_documents_leave_the_plain_ones_unchanged():
    task = SyntheticTask(0)
    plain, half, chat = (task.pretrain_documents(200, share) for share in (0.0, 0.5, 1.0))
    assert all(d.startswith("<user> ") and " <assistant> " in d for d in chat)
    changed = [h != p for h, p in zip(half, plain, strict=True)]
    assert 60 < sum(changed) < 140  # about half are chat documents
    assert all(h.startswith("<user> ") for h, c in zip(half, changed, strict=True) if c)
    # a chat document is its plain twin's prompt and answer
    prompt, answer = chat[0].removeprefix("<user> ").split(" <assistant> ")
    assert plain[0] in (answer, f"{prompt} {answer}")
