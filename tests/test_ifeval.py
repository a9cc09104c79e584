"""The IFEval task: the gold reward on hand-written answers for each constraint, the acceptability rules, IFEval's
strict accuracies, seeded and disjoint prompt splits, and SFT data and preference pairs from samples."""

import math
import pickle
import random

import pytest

pytest.importorskip("if_verifiable", reason="needs the ifeval extra: pip install 'salsa[ifeval]'")

from salsa.data import ifeval  # noqa: E402
from salsa.data.ifeval import (  # noqa: E402
    INSTRUCTIONS,
    IFPrompt,
    acceptable,
    best_of_n,
    build_prompt,
    combination_split,
    conflicts,
    draw_arguments,
    gold,
    ifeval_task,
    is_english,
    preference_pairs,
    strict_accuracy,
    task_data,
)
from salsa.data.synthetic import Example, Pair  # noqa: E402

REQUEST = "Write a short story about tea."
BASE = "Tea is a warm drink that many people enjoy in the morning with friends and family."
FRENCH = "Ceci est une réponse entièrement en français sans un seul mot anglais."

# instruction id -> (checker arguments, an answer that follows it, one that does not); every answer is acceptable
CASES: dict[str, tuple[dict, str, str]] = {
    "keywords:existence": (
        {"keywords": ["garden", "river"]},
        "My garden runs down to the river and I sit there with a cup of tea every day.",
        BASE,
    ),
    "keywords:frequency": (
        {"keyword": "tea", "frequency": 3, "relation": "at least"},
        "Tea is good. I drink tea every day. Green tea is my favorite drink of all.",
        BASE,
    ),
    "keywords:forbidden_words": (
        {"forbidden_words": ["coffee", "milk"]},
        BASE,
        "I like coffee with milk more than tea in the morning with my friends.",
    ),
    "keywords:letter_frequency": (
        {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
        BASE,
        "The lazy zebra dozed in the warm sun near the zoo and drank its tea.",
    ),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2},
        "Tea is a warm drink that many people enjoy.\n***\nIt is best with honey on a cold and rainy evening.",
        BASE,
    ),
    "length_constraints:number_words": (
        {"num_words": 10, "relation": "less than"},
        "Tea is a warm and lovely drink.",
        BASE,
    ),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "river"},
        "Tea is a warm drink that many people enjoy.\n\nRiver water makes the best tea in the spring.",
        "Tea is a warm drink that many people enjoy.\n\nThe river water makes the best tea in the spring.",
    ),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2},
        "Dear [name], please send the tea to [address] before the end of the week.",
        BASE,
    ),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, BASE + "\n\nP.S. Bring some cookies too.", BASE),
    "detectable_format:number_bullet_lists": (
        {"num_bullets": 2},
        "Tea is great for two reasons:\n* It is warm and calming.\n* It tastes lovely with honey.",
        BASE,
    ),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2},
        "Tea is *warm* and it is also *calming* for many people in the evening.",
        BASE,
    ),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nTea is a warm drink.\nSection 2\nMany people enjoy it in the morning with friends.",
        BASE,
    ),
    "detectable_format:json_format": (
        {},
        '{"topic": "tea", "text": "Tea is a warm drink that many people enjoy in the morning."}',
        BASE,
    ),
    "detectable_format:title": ({}, "<<Morning Tea>>\n" + BASE, BASE),
    "combination:two_responses": (
        {},
        "Tea is a warm drink that people enjoy.\n******\nTea is a calming drink for cold evenings.",
        BASE,
    ),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": REQUEST},
        REQUEST + " Once upon a time a girl made tea for her grandmother every morning.",
        BASE,
    ),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, BASE + " Any other questions?", BASE),
    "startend:quotation": ({}, f'"{BASE}"', BASE),
    "change_case:english_capital": ({}, BASE.upper(), BASE),
    "change_case:english_lowercase": ({}, BASE.lower(), BASE),
    "punctuation:no_comma": ({}, BASE, "Tea, coffee, and juice are drinks that many people enjoy in the morning."),
}


def spec_of(*ids: str, **overrides) -> IFPrompt:
    """A prompt of `REQUEST` under the constraints `ids`, with the arguments of `CASES` (or `overrides[id]`)."""
    return build_prompt(REQUEST, "tea", ids, [overrides.get(i, CASES[i][0]) for i in ids])


@pytest.fixture(scope="module")
def task():
    return ifeval_task(seed=0, n_prompts=300, n_eval_prompts=80)


def test_every_instruction_has_a_hand_case():
    assert set(CASES) == set(INSTRUCTIONS)
    assert not set(INSTRUCTIONS) & set(ifeval.EXCLUDED)


@pytest.mark.parametrize("instruction_id", INSTRUCTIONS)
def test_gold_reward_of_each_constraint(instruction_id):
    _, follows, breaks = CASES[instruction_id]
    spec = spec_of(instruction_id)
    assert acceptable(follows) and acceptable(breaks)
    assert gold(spec, follows, True) == 1.0
    assert gold(spec, breaks, True) == 0.0


def test_gold_reward_is_the_fraction_followed():
    spec = spec_of("punctuation:no_comma", "startend:quotation", "detectable_format:title")
    assert gold(spec, BASE) == pytest.approx(1 / 3)
    assert gold(spec, f'"<<Tea>> {BASE}"') == 1.0
    assert gold(spec, f'"<<Tea>>, {BASE}"') == pytest.approx(2 / 3)


def test_unacceptable_answers_score_zero():
    spec = spec_of("punctuation:no_comma")
    assert gold(spec, BASE, ended=True) == 1.0
    assert gold(spec, BASE, ended=False) == 0.0  # cut off by the length limit
    assert gold(spec, FRENCH, ended=True) == 0.0  # follows the constraint, but not in English
    assert gold(spec, "Tea is nice.", ended=True) == 0.0  # under MIN_WORDS words
    assert gold(spec, "", ended=True) == 0.0


def test_language_is_judged_only_on_enough_letters():
    assert not is_english(FRENCH)
    assert is_english(BASE) and is_english(BASE.upper()) and is_english(BASE.lower())
    short = "Pizza is my favorite food."  # English, but langdetect reads it as Italian
    assert sum(c.isalpha() for c in short) < ifeval.MIN_LANGUAGE_LETTERS and is_english(short)
    assert acceptable("Le thé est très bon.")  # too few letters to judge: accepted
    assert [is_english(FRENCH) for _ in range(3)] == [False] * 3


def test_strict_accuracies():
    two = spec_of("punctuation:no_comma", "detectable_format:title")
    three = spec_of("startend:quotation", "detectable_content:postscript", "keywords:existence")
    out = strict_accuracy([two, three], ["<<Tea>> " + BASE, BASE + "\nP.S. See you soon."])
    assert out == {"prompt_level": 0.5, "instruction_level": 3 / 5, "n_prompts": 2.0, "n_instructions": 5.0}
    assert strict_accuracy([two], [""])["instruction_level"] == 0.0  # an empty answer follows nothing
    assert math.isnan(strict_accuracy([], [])["prompt_level"])


def test_checkers_run_offline_and_draws_leave_the_global_random_alone():
    rng, state = random.Random(0), random.getstate()
    for i in INSTRUCTIONS:
        spec = build_prompt(REQUEST, "tea", [i], [draw_arguments(rng, i, REQUEST, set())])
        assert isinstance(gold(spec, BASE), float)
    assert random.getstate() == state


def test_prompts_are_seeded_and_splits_disjoint(task):
    again = ifeval_task(seed=0, n_prompts=300, n_eval_prompts=80)
    assert again.splits == task.splits
    assert ifeval_task(seed=1, n_prompts=300, n_eval_prompts=80).prompts("train") != task.prompts("train")
    train, held = task.splits["train"], task.splits["eval"]
    assert len(train) == 300 and len(held) == 80
    assert len({s.text for s in train + held}) == 380
    assert not {s.topic for s in train} & {s.topic for s in held}
    assert not {frozenset(s.instruction_ids) for s in train} & {frozenset(s.instruction_ids) for s in held}
    assert all(combination_split(s.instruction_ids) == "train" for s in train)
    assert {len(s.instruction_ids) for s in train} == {1, 2, 3}


def test_a_split_without_topics_is_an_error():
    with pytest.raises(ValueError, match="0 topics"):
        ifeval_task(seed=0, n_prompts=10, n_eval_prompts=5, eval_share=0.0)


def test_prompts_have_no_conflicting_constraints(task):
    table = conflicts()
    for s in task.splits["train"] + task.splits["eval"]:
        assert set(s.instruction_ids) <= set(INSTRUCTIONS)
        assert all(b not in table[a] for a in s.instruction_ids for b in s.instruction_ids if a != b)
        request = s.text.split(".")[0]
        assert s.topic in request
        keywords = []
        for kw in s.arguments():
            keywords += [*kw.get("keywords", ()), *kw.get("forbidden_words", ())]
            keywords += [kw[k] for k in ("keyword", "first_word") if k in kw]
        assert len(keywords) == len(set(keywords)) and not set(keywords) & set(request.lower().split())


def test_judge_finds_the_spec_from_the_text(task):
    text = task.prompts("eval")[0]
    assert task.spec(text) is task.spec(f" {text}\n") is task.splits["eval"][0]
    assert task.judge(text, BASE, False) == 0.0
    with pytest.raises(KeyError, match="not a prompt"):
        task.judge("Write a poem.", BASE, True)
    judge = pickle.loads(pickle.dumps(task.judge))  # spawned workers get the judge by pickling
    assert judge(text, BASE, True) == task.judge(text, BASE, True)
    acc = task.strict_accuracy(task.prompts("eval")[:3], [BASE] * 3)
    assert acc["n_prompts"] == 3.0


SAMPLES = [
    [("a", True), ("b", True), ("c", True)],  # b and c tie at 0.5: the first wins
    [("d", True), ("e", False)],  # all score 0: dropped
    [],
]
SCORES = {"a": 0.0, "b": 0.5, "c": 0.5, "d": 0.0, "e": 0.0}


def fake_judge(prompt, response, ended):
    return SCORES[response]


def test_best_of_n():
    assert best_of_n(["p", "q", "r"], SAMPLES, fake_judge) == [Example("p", "b", True)]
    kept = best_of_n(["p", "q", "r"], SAMPLES, fake_judge, drop_zero=False)
    assert kept == [Example("p", "b", True), Example("q", "d", True)]
    with pytest.raises(ValueError):
        best_of_n(["p"], SAMPLES, fake_judge)


def test_best_of_n_with_the_gold_reward():
    spec = spec_of("startend:quotation")
    out = best_of_n(
        [spec.text], [[(BASE, True), (f'"{BASE}"', False), (f'"{BASE}"', True)]], lambda p, r, e: gold(spec, r, e)
    )
    assert out == [Example(spec.text, f'"{BASE}"', True)]


def test_preference_pairs_follow_the_gold_when_the_rater_is_sharp():
    scores = {f"r{i}": i / 10 for i in range(10)}
    prompts = [f"p{i}" for i in range(40)]
    samples = [[(f"r{(i + k) % 10}", True) for k in range(4)] for i in range(40)]
    pairs = preference_pairs(prompts, samples, lambda p, r, e: scores[r], rater_temperature=1e-9, seed=0)
    assert len(pairs) == 40
    assert all(scores[x.chosen] > scores[x.rejected] for x in pairs)
    assert all(x.gold_margin == pytest.approx(scores[x.chosen] - scores[x.rejected]) for x in pairs)
    assert preference_pairs(prompts, samples, lambda p, r, e: scores[r], 1e-9, seed=0) == pairs
    noisy = [preference_pairs(prompts, samples, lambda p, r, e: scores[r], 10.0, seed=s) for s in (0, 0, 1)]
    assert noisy[0] == noisy[1] != noisy[2]
    assert any(x.gold_margin < 0 for x in noisy[0])  # a noisy rater sometimes prefers the worse answer


def test_preference_pairs_skip_prompts_without_two_distinct_samples():
    samples = [[("a", True), ("a", True)], [("b", True)], [("c", True), ("c", False)]]
    pairs = preference_pairs(["p", "q", "r"], samples, lambda p, r, e: float(e), 1e-9, seed=0)
    assert pairs == [Pair("r", "c", "c", True, False, 1.0)]
    assert preference_pairs(["r"], samples[2:], lambda p, r, e: 0.0, 1.0, seed=0, drop_ties=True) == []
    with pytest.raises(ValueError, match="rater_temperature"):
        preference_pairs(["r"], samples[2:], lambda p, r, e: 0.0, 0.0, seed=0)


def test_task_data(task):
    sft = [Example(p, BASE) for p in task.prompts("train")[:10]]
    pairs = [Pair(task.prompts("train")[0], BASE, "no")]
    data = task_data(task, sft, pairs, pairs[:1])
    assert data.name == "ifeval" and data.judge == task.judge
    assert data.sft_train == sft[:9] and data.sft_val == sft[9:]
    assert data.prompts_train == task.prompts("train") and data.prompts_eval == task.prompts("eval")
    assert data.pairs_train == pairs and data.pretrain == []
