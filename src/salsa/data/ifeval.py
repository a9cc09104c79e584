"""Instruction following with verifiable constraints (IFEval, Zhou et al. 2023) as a task with a gold reward.

A prompt is a short writing request about an everyday topic ("Write a short blog post about rainy days.") followed
by one to three constraints that a program can check ("Answer with less than 60 words.", "Wrap your entire response
with double quotation marks."). The descriptions and checkers are IFEval's own, from the `if-verifiable` package
(`pip install 'salsa[ifeval]'`); the arguments of each constraint (keywords, counts, markers) are drawn here, from a
seeded `random.Random`, so the prompts are the same for the same seed and IFEval's global-random draws are never
used.

Constraints (`INSTRUCTIONS`): the IFEval checkers that run offline with the installed packages and fit a writing
request in English; `EXCLUDED` names the others and why. Two IFEval checkers need NLTK's punkt tokenizer data
(`punkt_tab`), a separate download, and fail with a `LookupError` without it: `length_constraints:number_sentences`
(counts sentences with punkt) and `change_case:capital_word_frequency` (splits words with `nltk.word_tokenize`).
Two more run but do not fit: `language:response_language` asks for a language other than English, which the gold
reward does not accept, and `detectable_format:constrained_response` asks for a fixed "My answer is yes / no /
maybe." instead of a piece of writing (IFEval lets it combine with nothing). IFEval itself registers no checker for
key sentences, rephrasing or a constrained start. The all-capitals checker (`change_case:english_capital`) asks
langdetect about the capitalised text as it is, and misreads some English in capitals as another language; the gold
reward keeps IFEval's verdict.

Combinations: no two constraints of a prompt conflict, by IFEval's conflicts table (made symmetric) plus one pair of
rules it misses (`EXTRA_CONFLICTS`: a response in all capital or all lowercase letters cannot carry "Section" or
"SECTION" markers). Keywords a prompt asks for or forbids are distinct and never words of the request itself, and a
"less than" letter count is only asked of a rare letter the request and the required words do not contain, so a
prompt's arguments never contradict each other.

Splits: the topics are split by a seeded permutation and every combination of constraints (the set of instruction
ids) by a seeded hash, so the held-out prompts (`"eval"`) share neither a topic nor a combination with the training
prompts (`"train"`).

The gold reward (`gold`) of a response is `acceptable * followed / constraints`, in [0, 1]:

- acceptable (`acceptable`) is 1 when the response ended by itself (closed with the end token), has at least
  `MIN_WORDS` words, and is in English (`is_english`: langdetect, seeded, says "en"; only judged from
  `MIN_LANGUAGE_LETTERS` letters on, below which the detector often mistakes short English for another language),
  else 0;
- followed is the number of the prompt's constraints whose checker accepts the response (IFEval's strict check).

An unacceptable response scores 0, the same as an acceptable one that follows nothing: a floor keeps the reward
bounded, and no response scores below an acceptable one, so breaking the rules never pays. IFEval's own metrics are
`strict_accuracy`: prompt-level (all constraints followed) and instruction-level (constraints followed, over all).

SFT data and preference pairs come from the instruct model's own samples (`best_of_n`, `preference_pairs`), which
`task_data` completes into a `TaskData`. `data=ifeval` (`ifeval_data`) cuts the training prompts into disjoint SFT,
pair and PPO sets and asks the samples stage (`salsa.stages.samples`) for the base model's answers, of which
`complete_task` makes the SFT data and pairs. Everything is seeded and pure: the same seed gives the same prompts.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from salsa.data.synthetic import Example, Pair
from salsa.data.task import Answer, SampleRequest, TaskData
from salsa.errors import ConfigError, SalsaError

# ---------------------------------------------------------------------------------------------------------------
# 1. Requests and constraints
# ---------------------------------------------------------------------------------------------------------------
_TOPIC_LINES = """
coffee; tea; breakfast; fresh bread; pancakes; soup; sandwiches; pizza; ice cream; chocolate
apples; bananas; strawberries; vegetables; rice; pasta; salad; cookies; birthday cake; lemonade
hot cocoa; popcorn; cheese; honey; picnic lunches; family dinners; home cooking; baking bread; school lunches; tacos
houseplants; a tidy kitchen; doing laundry; washing dishes; a cozy bedroom; moving house; good neighbors
a front porch; candles; old photographs; family recipes; a favorite chair; spring cleaning; a quiet evening at home
rainy days; sunny mornings; snow; thunderstorms; autumn leaves; spring flowers; the ocean; rivers; mountains
forests; lakes; sunsets; the moon; stars at night; rainbows; windy weather; the desert; islands; waterfalls
dogs; cats; goldfish; horses; songbirds; bees; butterflies; owls; rabbits; squirrels; ducks; frogs; turtles
elephants; penguins; dolphins; bird watching; a trip to the zoo; farm animals; taking care of a puppy
reading; writing letters; keeping a diary; drawing; painting; photography; knitting; gardening; growing tomatoes
fishing; camping; hiking; board games; card games; chess; jigsaw puzzles; crossword puzzles; collecting stamps
playing the guitar; learning the piano; singing in a choir; dancing; woodworking; model trains; flying a kite
soccer; basketball; tennis; swimming; running; cycling; yoga; skateboarding; ice skating; skiing; bowling
table tennis; a morning walk; a local sports team; team sports
the public library; city parks; farmers markets; the grocery store; a small bakery; a train station; airports
museums; the post office; a playground; a coffee shop; a bookshop; the beach; a swimming pool; a village square
riding a bike; trains; buses; road trips; packing a suitcase; paper maps; postcards; visiting a new city
staying in a hotel; a long flight; sailing boats; walking to work; getting lost; souvenirs; a weekend trip
the first day of school; homework; a favorite teacher; learning a new language; field trips; science experiments
math puzzles; spelling tests; a school play; working from home; a first job; teamwork; taking notes; meetings
birthday parties; weddings; holidays with family; new year resolutions; making friends; grandparents; siblings
babysitting; moving to a new town; saving money; pocket money; a good sleep; morning routines; weekends
mobile phones; computers; email; video calls; old radios; television; alarm clocks; umbrellas; backpacks
sneakers; winter coats; hats; fixing a bicycle; paper airplanes; drinking water; healthy snacks; stretching
taking breaks; laughter; kindness; patience; helping others; volunteering; recycling; saving energy; planting trees
clean streets; street musicians; a rainy bus ride; fireworks; summer holidays; winter mornings; sandcastles
snowmen; sledding; lighthouses; bridges; tall buildings; small towns; country roads; a family pet; a lost sock
"""
TOPICS: tuple[str, ...] = tuple(t.strip() for line in _TOPIC_LINES.strip().splitlines() for t in line.split(";"))

# writing requests without commas, so a "repeat the request" prompt can also forbid commas
TEMPLATES: tuple[str, ...] = (
    "Write a short paragraph about {topic}.",
    "Write a short blog post about {topic}.",
    "Write a short story about {topic}.",
    "Write a letter to a friend about {topic}.",
    "Write a short essay about {topic}.",
)

INSTRUCTIONS: tuple[str, ...] = (
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "length_constraints:number_paragraphs",
    "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "combination:two_responses",
    "combination:repeat_prompt",
    "startend:end_checker",
    "startend:quotation",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
)
EXCLUDED: dict[str, str] = {
    "length_constraints:number_sentences": "counts sentences with NLTK's punkt: its data is a download (LookupError)",
    "change_case:capital_word_frequency": "splits words with nltk.word_tokenize: punkt again (LookupError)",
    "language:response_language": "asks for a language other than English, which the gold reward does not accept",
    "detectable_format:constrained_response": "asks for a fixed yes / no / maybe answer, not a piece of writing",
}
EXTRA_CONFLICTS: tuple[tuple[str, str], ...] = (
    ("change_case:english_capital", "detectable_format:multiple_sections"),
    ("change_case:english_lowercase", "detectable_format:multiple_sections"),
)

# argument ranges: IFEval's, except words (IFEval: 100-500) so that an answer fits a short generation budget, and
# paragraphs and sections from 2 so that the descriptions' plurals read right
RELATIONS = ("less than", "at least")
NUM_WORDS = tuple(range(20, 160, 10))
RARE_LETTERS = "jqxz"
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
SECTION_MARKERS = ("Section", "SECTION")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?")

MIN_WORDS = 5
MIN_LANGUAGE_LETTERS = 40


@functools.cache
def _ifeval():
    """IFEval's instruction modules (`if-verifiable`), imported on first use."""
    try:
        from if_verifiable.ifeval import instructions_registry, instructions_util
    except ImportError as e:
        raise SalsaError("data=ifeval needs Python 3.11 or later and: pip install 'salsa[ifeval]'") from e
    return instructions_registry, instructions_util


def conflicts(instructions: Iterable[str] = INSTRUCTIONS) -> dict[str, frozenset[str]]:
    """For each instruction id, the ids it may not share a prompt with (itself included): IFEval's table, made
    symmetric, plus `EXTRA_CONFLICTS`."""
    ids = set(instructions)
    table: dict[str, set[str]] = {i: {i} for i in ids}
    pairs = [(a, b) for a, bs in _ifeval()[0].INSTRUCTION_CONFLICTS.items() for b in bs]
    for a, b in [*pairs, *EXTRA_CONFLICTS]:
        if a in ids and b in ids:
            table[a].add(b)
            table[b].add(a)
    return {i: frozenset(c) for i, c in table.items()}


def combinations(instructions: Sequence[str] = INSTRUCTIONS, max_size: int = 3) -> list[frozenset[str]]:
    """Every set of 1 to `max_size` instruction ids without a conflicting pair, in a fixed order."""
    table = conflicts(instructions)
    ids = sorted(instructions)
    out = []
    for k in range(1, max_size + 1):
        for combo in itertools.combinations(ids, k):
            if all(b not in table[a] for a, b in itertools.combinations(combo, 2)):
                out.append(frozenset(combo))
    return out


def _unit(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by `seed` and `key` (a hash, the same in every process)."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def combination_split(combo: Iterable[str], seed: int = 0, eval_share: float = 0.2) -> str:
    """`"eval"` for about `eval_share` of the combinations (by a seeded hash of the sorted ids), else `"train"`."""
    return "eval" if _unit(seed, "+".join(sorted(combo))) < eval_share else "train"


def topic_split(seed: int = 0, eval_share: float = 0.2, topics: Sequence[str] = TOPICS) -> dict[str, list[str]]:
    """The topics cut in two by a seeded permutation: `round(eval_share * len(topics))` held out for `"eval"`."""
    order = list(topics)
    random.Random(f"{seed}:topics").shuffle(order)
    cut = round(eval_share * len(order))
    return {"train": order[cut:], "eval": order[:cut]}


# ---------------------------------------------------------------------------------------------------------------
# 2. Prompts
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IFPrompt:
    """A prompt and what it asks: `text` is what the model sees (the request, then one description per
    constraint); `kwargs[i]` are the arguments of the checker of `instruction_ids[i]`, as (name, value) pairs."""

    text: str
    topic: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[tuple[tuple[str, Any], ...], ...]

    def arguments(self) -> list[dict[str, Any]]:
        """The checkers' arguments as dicts, in the order of `instruction_ids`."""
        return [dict(kw) for kw in self.kwargs]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _text_order(ids: Iterable[str]) -> list[str]:
    """The order constraints are drawn and described in: repeating the request first (it must follow the request),
    counting a letter last (it avoids the letters of the words drawn before it), the rest by id."""
    first, last = "combination:repeat_prompt", "keywords:letter_frequency"
    return sorted(ids, key=lambda i: (i != first, i == last, i))


def draw_arguments(rng: random.Random, instruction_id: str, request: str, taken: set[str]) -> dict[str, Any]:
    """The checker arguments of one constraint. Keywords are drawn from IFEval's word list, never from `taken`
    (the request's words and the keywords already drawn for the prompt), and are added to it; a "less than" letter
    count takes a rare letter absent from `taken` (so that a response can avoid it), or else becomes "at least"."""

    def keywords(k: int) -> tuple[str, ...]:
        pool = [w for w in _ifeval()[1].WORD_LIST if w not in taken]
        words = tuple(sorted(rng.sample(pool, k)))
        taken.update(words)
        return words

    match instruction_id:
        case "keywords:existence":
            return {"keywords": keywords(2)}
        case "keywords:forbidden_words":
            return {"forbidden_words": keywords(2)}
        case "keywords:frequency":
            return {"keyword": keywords(1)[0], "frequency": rng.randint(1, 3), "relation": rng.choice(RELATIONS)}
        case "keywords:letter_frequency":
            relation = rng.choice(RELATIONS)
            rare = [c for c in RARE_LETTERS if not any(c in w for w in taken)]
            if relation == "less than" and rare:
                letter = rng.choice(rare)
            else:
                relation, letter = "at least", rng.choice(string.ascii_lowercase)
            return {"letter": letter, "let_frequency": rng.randint(1, 10), "let_relation": relation}
        case "length_constraints:number_paragraphs":
            return {"num_paragraphs": rng.randint(2, 5)}
        case "length_constraints:number_words":
            return {"num_words": rng.choice(NUM_WORDS), "relation": rng.choice(RELATIONS)}
        case "length_constraints:nth_paragraph_first_word":
            n = rng.randint(2, 5)
            return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": keywords(1)[0]}
        case "detectable_content:number_placeholders":
            return {"num_placeholders": rng.randint(1, 4)}
        case "detectable_content:postscript":
            return {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)}
        case "detectable_format:number_bullet_lists":
            return {"num_bullets": rng.randint(1, 5)}
        case "detectable_format:number_highlighted_sections":
            return {"num_highlights": rng.randint(1, 4)}
        case "detectable_format:multiple_sections":
            return {"section_spliter": rng.choice(SECTION_MARKERS), "num_sections": rng.randint(2, 5)}
        case "combination:repeat_prompt":
            return {"prompt_to_repeat": request}
        case "startend:end_checker":
            return {"end_phrase": rng.choice(END_PHRASES)}
        case _:
            return {}  # json_format, title, two_responses, quotation, english_capital/lowercase, no_comma


def checkers(spec: IFPrompt) -> list:
    """IFEval's checker of each constraint of `spec`, built with its arguments (no random draw)."""
    registry = _ifeval()[0].INSTRUCTION_DICT
    out = []
    for iid, kw in zip(spec.instruction_ids, spec.arguments(), strict=True):
        checker = registry[iid](iid)
        checker.build_description(**kw)
        out.append(checker)
    return out


def build_prompt(request: str, topic: str, ids: Sequence[str], arguments: Sequence[dict[str, Any]]) -> IFPrompt:
    """The prompt of `request` under the constraints `ids` with checker `arguments`, described in that order."""
    registry = _ifeval()[0].INSTRUCTION_DICT
    descriptions = [registry[i](i).build_description(**kw) for i, kw in zip(ids, arguments, strict=True)]
    kwargs = tuple(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()) for kw in arguments)
    return IFPrompt(" ".join([request, *descriptions]), topic, tuple(ids), kwargs)


def make_prompt(rng: random.Random, topic: str, template: str, combo: Iterable[str]) -> IFPrompt:
    """The prompt asking `template` about `topic` under the constraints `combo`, arguments drawn from `rng`."""
    request = template.format(topic=topic)
    taken = _words(request)
    ids = _text_order(combo)
    return build_prompt(request, topic, ids, [draw_arguments(rng, i, request, taken) for i in ids])


def draw_prompts(
    n: int,
    topics: Sequence[str],
    combos: Sequence[frozenset[str]],
    rng: random.Random,
    max_tries: int = 50,
    max_chars: int | None = None,
) -> list[IFPrompt]:
    """`n` distinct prompts: each a random topic and template, a size drawn uniformly among the combination sizes
    present, then a combination of that size. With `max_chars`, longer prompts are drawn again (so that a prompt fits
    the models' prompt length whole)."""
    if n and not (topics and combos):
        raise ValueError(f"{n} prompts asked from {len(topics)} topics and {len(combos)} sets of constraints")
    by_size: dict[int, list[tuple[str, ...]]] = {}
    for c in sorted(tuple(sorted(c)) for c in combos):
        by_size.setdefault(len(c), []).append(c)
    sizes = sorted(by_size)
    out: list[IFPrompt] = []
    seen: set[str] = set()
    for _ in range(max_tries * n):
        if len(out) == n:
            break
        topic, template = rng.choice(topics), rng.choice(TEMPLATES)
        spec = make_prompt(rng, topic, template, rng.choice(by_size[rng.choice(sizes)]))
        if spec.text not in seen and (max_chars is None or len(spec.text) <= max_chars):
            seen.add(spec.text)
            out.append(spec)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct prompts of {n} from {len(topics)} topics and {len(combos)} sets")
    return out


# ---------------------------------------------------------------------------------------------------------------
# 3. The gold reward
# ---------------------------------------------------------------------------------------------------------------
def count_words(text: str) -> int:
    """Words as IFEval counts them: runs of letters, digits and underscores."""
    return len(re.findall(r"\w+", text))


def is_english(text: str) -> bool:
    """langdetect (seed 0) reads `text` as English; True below `MIN_LANGUAGE_LETTERS` letters, where it is unreliable.
    A text all in capitals is read lowercased (the detector mistakes capitalised English for other languages)."""
    if sum(c.isalpha() for c in text) < MIN_LANGUAGE_LETTERS:
        return True
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0
    try:
        return detect(text.lower() if text.isupper() else text) == "en"
    except LangDetectException:
        return False


def acceptable(response: str, ended: bool = True) -> bool:
    """The response ended by itself, has at least `MIN_WORDS` words and is in English (`is_english`)."""
    return bool(ended) and count_words(response) >= MIN_WORDS and is_english(response)


def followed(spec: IFPrompt, response: str) -> list[bool]:
    """IFEval's strict check of each constraint of `spec` (an empty response follows nothing)."""
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0  # the case checkers also ask langdetect
    return [bool(response.strip()) and bool(c.check_following(response)) for c in checkers(spec)]


def gold(spec: IFPrompt, response: str, ended: bool = True) -> float:
    """r*(prompt, response) = acceptable * (fraction of the constraints followed), in [0, 1]."""
    if not acceptable(response, ended):
        return 0.0
    flags = followed(spec, response)
    return sum(flags) / len(flags)


def strict_accuracy(specs: Sequence[IFPrompt], responses: Sequence[str]) -> dict[str, float]:
    """IFEval's strict accuracies: `prompt_level` (share of responses that follow all their constraints) and
    `instruction_level` (share of all constraints followed), with the counts they are over."""
    flags = [followed(s, r) for s, r in zip(specs, responses, strict=True)]
    n_instructions = sum(len(f) for f in flags)
    return {
        "prompt_level": sum(all(f) for f in flags) / len(flags) if flags else math.nan,
        "instruction_level": sum(sum(f) for f in flags) / n_instructions if n_instructions else math.nan,
        "n_prompts": float(len(flags)),
        "n_instructions": float(n_instructions),
    }


# ---------------------------------------------------------------------------------------------------------------
# 4. SFT data and preference pairs from the model's samples
# ---------------------------------------------------------------------------------------------------------------
Judge = Callable[[str, str, bool], float]


def best_of_n(
    prompts: Sequence[str], samples: Sequence[Sequence[tuple[str, bool]]], judge: Judge, drop_zero: bool = True
) -> list[Example]:
    """Rejection sampling: per prompt, the sample (`(response, ended)`) with the highest gold reward, the first on
    ties. With `drop_zero`, prompts whose best scores 0 (no acceptable sample follows anything) give no example:
    imitating them would teach nothing the task rewards. Prompts without samples give none either."""
    out = []
    for prompt, group in zip(prompts, samples, strict=True):
        if not group:
            continue
        scores = [judge(prompt, text, bool(ended)) for text, ended in group]
        best = max(range(len(group)), key=scores.__getitem__)
        if drop_zero and scores[best] <= 0:
            continue
        out.append(Example(prompt, group[best][0], bool(group[best][1])))
    return out


def preference_probability(margin: float, temperature: float) -> float:
    """Bradley–Terry: sigmoid(margin / temperature), the chance the rater prefers the response `margin` better."""
    if temperature <= 0:
        raise ValueError(f"rater_temperature must be positive, got {temperature!r}")
    return 0.5 * (1.0 + math.tanh(margin / (2.0 * temperature)))  # = sigmoid, without overflow for tiny temperatures


def preference_pairs(
    prompts: Sequence[str],
    samples: Sequence[Sequence[tuple[str, bool]]],
    judge: Judge,
    rater_temperature: float = 1.0,
    seed: int = 0,
    drop_ties: bool = False,
) -> list[Pair]:
    """Two distinct samples per prompt (drawn by seed; prompts with fewer give none), labelled like the synthetic
    task's raters: a is chosen with probability sigmoid((r*(a) - r*(b)) / rater_temperature), and `gold_margin` is
    r*(chosen) - r*(rejected). With `drop_ties`, pairs of equal gold reward (a coin flip) are left out."""
    rng = random.Random(f"{seed}:pairs")
    out = []
    for prompt, group in zip(prompts, samples, strict=True):
        distinct = list(dict.fromkeys((text, bool(ended)) for text, ended in group))
        if len(distinct) < 2:
            continue
        i, j = rng.sample(range(len(distinct)), 2)
        (a, ea), (b, eb) = distinct[i], distinct[j]
        margin = judge(prompt, a, ea) - judge(prompt, b, eb)
        if drop_ties and margin == 0:
            continue
        if rng.random() < preference_probability(margin, rater_temperature):
            out.append(Pair(prompt, a, b, ea, eb, margin))
        else:
            out.append(Pair(prompt, b, a, eb, ea, -margin))
    return out


# ---------------------------------------------------------------------------------------------------------------
# 5. The task
# ---------------------------------------------------------------------------------------------------------------
class IFEvalTask:
    """Training and held-out prompts with their specs; `judge` is the gold reward of a prompt's text."""

    def __init__(self, train: Sequence[IFPrompt], held_out: Sequence[IFPrompt], instructions: Sequence[str]):
        self.splits = {"train": list(train), "eval": list(held_out)}
        self.instructions = tuple(instructions)
        self._specs = {s.text: s for s in [*train, *held_out]}

    def prompts(self, split: str) -> list[str]:
        """The texts of the `"train"` or `"eval"` prompts."""
        return [s.text for s in self.splits[split]]

    def spec(self, text: str) -> IFPrompt:
        """The spec of a prompt of this task, from its text (surrounding whitespace ignored)."""
        found = self._specs.get(text) or self._specs.get(text.strip())
        if found is None:
            raise KeyError(f"not a prompt of this task: {text[:80]!r}")
        return found

    def judge(self, prompt: str, response: str, ended: bool = True) -> float:
        """The gold reward (`gold`) of `response` to the prompt with text `prompt`."""
        return gold(self.spec(prompt), response, ended)

    def strict_accuracy(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """IFEval's strict accuracies (`strict_accuracy`) of `responses[i]` to the prompt with text `prompts[i]`."""
        return strict_accuracy([self.spec(p) for p in prompts], responses)

    def metrics(self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool] = ()) -> dict[str, float]:
        """What evaluation reports of a model's answers: IFEval's prompt- and instruction-level strict accuracies
        (`ifeval_prompt_strict`, `ifeval_instruction_strict`). As in IFEval, an answer is checked as it is, whether
        or not it ended (the gold reward, in contrast, gives a cut answer 0)."""
        acc = self.strict_accuracy(prompts, responses)
        return {"ifeval_prompt_strict": acc["prompt_level"], "ifeval_instruction_strict": acc["instruction_level"]}


def ifeval_task(
    seed: int = 0,
    n_prompts: int = 2000,
    n_eval_prompts: int = 200,
    eval_share: float = 0.2,
    max_constraints: int = 3,
    instructions: Sequence[str] = INSTRUCTIONS,
    max_prompt_chars: int | None = None,
) -> IFEvalTask:
    """Seeded prompts: `n_prompts` for training and `n_eval_prompts` held out, disjoint in topics and in the sets of
    constraints (`eval_share` of each is held out; see `topic_split`, `combination_split`), each at most
    `max_prompt_chars` characters long (None: any length)."""
    topics = topic_split(seed, eval_share)
    combos: dict[str, list[frozenset[str]]] = {"train": [], "eval": []}
    for c in combinations(instructions, max_constraints):
        combos[combination_split(c, seed, eval_share)].append(c)
    drawn = {
        split: draw_prompts(
            n, topics[split], combos[split], random.Random(f"{seed}:prompts/{split}"), max_chars=max_prompt_chars
        )
        for split, n in (("train", n_prompts), ("eval", n_eval_prompts))
    }
    return IFEvalTask(drawn["train"], drawn["eval"], instructions)


def task_data(
    task: IFEvalTask,
    sft_examples: Sequence[Example],
    pairs_train: Sequence[Pair],
    pairs_val: Sequence[Pair],
    sft_val_share: float = 0.1,
    sft_val: Sequence[Example] | None = None,
    prompts_train: Sequence[str] | None = None,
) -> TaskData:
    """The `TaskData` of `data=ifeval`, from the task and the data made from samples (`best_of_n`,
    `preference_pairs`): SFT validation is `sft_val` when given, else the last `sft_val_share` of `sft_examples`
    (at least one when there are two); PPO's prompts are `prompts_train` when given, else all training prompts."""
    if sft_val is None:
        n_val = round(sft_val_share * len(sft_examples))
        if sft_val_share > 0 and len(sft_examples) >= 2:
            n_val = max(n_val, 1)
        cut = len(sft_examples) - n_val
        sft_examples, sft_val = sft_examples[:cut], sft_examples[cut:]
    return TaskData(
        name="ifeval",
        sft_train=list(sft_examples),
        sft_val=list(sft_val),
        pairs_train=list(pairs_train),
        pairs_val=list(pairs_val),
        prompts_train=list(task.prompts("train") if prompts_train is None else prompts_train),
        prompts_eval=task.prompts("eval"),
        judge=task.judge,
        metrics=task.metrics,
    )


# ---------------------------------------------------------------------------------------------------------------
# 6. data=ifeval: prompts now, SFT data and pairs once the base model has answered (the samples stage)
# ---------------------------------------------------------------------------------------------------------------
# what the training prompts are used for, in the order they are cut from the seeded draw; every prompt has one role
ROLES = ("sft", "sft_val", "pairs", "pairs_val", "ppo")
SAMPLED_ROLES = ROLES[:4]  # the prompts the base model answers


class SamplesError(SalsaError, ValueError):
    """The base model's answers cannot make the task's SFT data or preference pairs."""


def assign_roles(prompts: Sequence[str], counts: dict[str, int]) -> dict[str, list[str]]:
    """`prompts` cut in consecutive, disjoint runs of `counts[role]` prompts, in the order of `ROLES`."""
    need = sum(counts[r] for r in ROLES)
    if len(prompts) < need:
        raise ValueError(f"{need} training prompts needed ({counts}), {len(prompts)} given")
    out, start = {}, 0
    for role in ROLES:
        out[role] = list(prompts[start : start + counts[role]])
        start += counts[role]
    return out


def _summary(groups: Sequence[Sequence[Answer]]) -> str:
    answers = [a for g in groups for a in g]
    ended = sum(bool(e) for _, e, _ in answers)
    scored = sum(g > 0 for _, _, g in answers)
    return f"{len(answers)} answers to {len(groups)} prompts, {ended} ended, {scored} scored above 0"


def complete_task(
    task: IFEvalTask,
    roles: dict[str, list[str]],
    rater_temperature: float,
    seed: int,
    drop_tied_pairs: bool,
    sft_keep_zero: bool,
    answers: Sequence[Sequence[Answer]],
) -> TaskData:
    """The `TaskData` of `data=ifeval` from the base model's judged answers (`answers[i]`: the answers to the i-th
    prompt of `SAMPLED_ROLES`, in role order): SFT and SFT-validation examples are the best answer per prompt
    (`best_of_n`; prompts where none scores above 0 give none, unless `sft_keep_zero`), preference pairs two answers
    per prompt labelled by the noisy rater (`preference_pairs`, training and validation pairs from their own
    prompts). The answers' stored gold rewards are used as they are. Raises `SamplesError` when a set comes out
    empty, with what the answers were."""
    sampled = [p for r in SAMPLED_ROLES for p in roles[r]]
    if len(answers) != len(sampled):
        raise ValueError(f"{len(answers)} groups of answers for {len(sampled)} sampled prompts")
    groups = dict(zip(sampled, answers, strict=True))
    stored = {(p, t, bool(e)): g for p in sampled for t, e, g in groups[p]}

    def judge(prompt: str, response: str, ended: bool) -> float:
        return stored[(prompt, response, bool(ended))]

    def of(role: str) -> list[list[tuple[str, bool]]]:
        return [[(t, bool(e)) for t, e, _ in groups[p]] for p in roles[role]]

    sft = {r: best_of_n(roles[r], of(r), judge, drop_zero=not sft_keep_zero) for r in ("sft", "sft_val")}
    for r, key in (("sft", "n_sft"), ("sft_val", "n_sft_val")):
        if not sft[r]:
            raise SamplesError(
                f"no SFT example: none of the base model's answers to the data.task.{key} prompts scores above 0 "
                f"({_summary([groups[p] for p in roles[r]])}). An answer scores only if it ends within "
                "data.task.max_new_tokens: raise it, or data.task.samples_per_prompt, or use a stronger instruct model "
                "(data.task.sft_keep_zero=true imitates the best answers all the same)"
            )
    pair_prompts = roles["pairs"] + roles["pairs_val"]
    pairs = preference_pairs(pair_prompts, of("pairs") + of("pairs_val"), judge, rater_temperature, seed,
                             drop_tied_pairs)  # fmt: skip
    val_prompts = set(roles["pairs_val"])
    pairs_train = [x for x in pairs if x.prompt not in val_prompts]
    pairs_val = [x for x in pairs if x.prompt in val_prompts]
    for got, key in ((pairs_train, "n_pairs"), (pairs_val, "n_pairs_val")):
        if not got:
            which = "two answers of different gold reward" if drop_tied_pairs else "two different answers"
            fix = "set data.task.drop_tied_pairs=false" if drop_tied_pairs else "raise data.task.sample_temperature"
            summary = _summary([groups[p] for p in pair_prompts])
            raise SamplesError(f"no preference pair from the data.task.{key} prompts: none got {which} ({summary}): "
                               f"{fix}, or data.task.{key}")  # fmt: skip
    return task_data(task, sft["sft"], pairs_train, pairs_val, sft_val=sft["sft_val"], prompts_train=roles["ppo"])


def ifeval_data(
    seed: int = 0,
    rater_temperature: float = 0.1,
    n_pretrain: int = 0,
    n_sft: int = 1000,
    n_sft_val: int = 100,
    n_pairs: int = 2000,
    n_pairs_val: int = 200,
    n_prompts: int = 2000,
    n_eval_prompts: int = 200,
    samples_per_prompt: int = 4,
    sample_temperature: float = 0.8,
    max_new_tokens: int = 256,
    sample_batch_size: int = 64,
    max_prompt_chars: int | None = 350,
    max_constraints: int = 3,
    eval_share: float = 0.2,
    drop_tied_pairs: bool = False,
    sft_keep_zero: bool = False,
) -> TaskData:
    """The task of `data=ifeval` before the base model has answered: PPO and evaluation prompts, the gold reward
    and IFEval's strict accuracies (`IFEvalTask.metrics`), and the request (`SampleRequest`) the samples stage
    completes it by. The seeded training prompts are cut, in this order, into `n_sft` SFT, `n_sft_val` SFT-validation,
    `n_pairs` and `n_pairs_val` preference-pair and `n_prompts` PPO prompts, all disjoint (`assign_roles`). The base
    model answers each SFT prompt `samples_per_prompt` times (the best answer is kept) and each pair prompt twice
    (a pair compares two answers: more would only be drawn from), at `sample_temperature`, at most `max_new_tokens`
    new tokens, `sample_batch_size` answers at a time; `complete_task` makes the data of the answers.

    `n_pretrain` is accepted and ignored: the task has no documents to pretrain on (it needs a pretrained instruct
    model; `debug=default` sets it for the embedded one). `max_prompt_chars`: longer prompts are drawn again, so
    that a prompt fits the models' prompt length whole (350 characters: at most 120 tokens in SmolLM2's chat
    template). `sft_keep_zero`: an SFT prompt whose best answer scores 0 gives that answer too (imitation of the
    model's own answers, for smoke runs too short for answers to score), instead of none.
    `drop_tied_pairs`: pairs of answers with the same gold reward (whose label is a coin flip) are left out."""
    counts = {"sft": n_sft, "sft_val": n_sft_val, "pairs": n_pairs, "pairs_val": n_pairs_val, "ppo": n_prompts}
    for role, key in zip(ROLES, ("n_sft", "n_sft_val", "n_pairs", "n_pairs_val", "n_prompts"), strict=True):
        if isinstance(counts[role], bool) or not isinstance(counts[role], int) or counts[role] < 1:
            raise ConfigError(f"data.task.{key}", f"must be a whole number ≥ 1, got {counts[role]!r}")
    sizes = {"samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens,
             "sample_batch_size": sample_batch_size}  # fmt: skip
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"data.task.{key}", f"must be a whole number ≥ 1, got {value!r}")
    for key, value in (("sample_temperature", sample_temperature), ("rater_temperature", rater_temperature)):
        if not value > 0:
            raise ConfigError(f"data.task.{key}", f"must be > 0, got {value!r}")
    task = ifeval_task(seed, sum(counts.values()), n_eval_prompts, eval_share, max_constraints,
                       max_prompt_chars=max_prompt_chars)  # fmt: skip
    roles = assign_roles(task.prompts("train"), counts)
    complete = functools.partial(complete_task, task, roles, rater_temperature, seed, drop_tied_pairs, sft_keep_zero)
    request = SampleRequest(
        prompts=[p for r in SAMPLED_ROLES for p in roles[r]],
        n=[samples_per_prompt if r.startswith("sft") else 2 for r in SAMPLED_ROLES for _ in roles[r]],
        temperature=sample_temperature,
        max_new_tokens=max_new_tokens,
        batch_size=sample_batch_size,
        seed=seed,
        complete=complete,
    )
    return TaskData(
        name="ifeval",
        sft_train=[],
        sft_val=[],
        pairs_train=[],
        pairs_val=[],
        prompts_train=roles["ppo"],
        prompts_eval=task.prompts("eval"),
        judge=task.judge,
        metrics=task.metrics,
        needs_samples=request,
    )
