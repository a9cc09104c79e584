"""The embedded preference task: a small English-like language with a gold reward.

It stands in for the paper's human raters and GPT-4 judge, offline. A prompt asks about one or two nouns of a
topic ("describe the fox and the owl ."); a response is a few short sentences. The gold reward r*(prompt, response)
scores a response on several properties at once (see `gold_components`), so a reward model learned from noisy
pairwise labels is an imperfect proxy of it, and a policy that over-optimises the proxy can lose gold reward.

The generator is seeded and pure: the same seed always gives the same corpus.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------------------------------
# 1. The lexicon
# ---------------------------------------------------------------------------------------------------------------
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    # topic: (nouns, intransitive verbs)
    "animals": (
        ["fox", "dog", "cat", "horse", "owl", "rabbit", "deer", "wolf", "bear", "duck", "goat", "mouse"],
        ["runs", "sleeps", "hunts", "hides", "jumps", "howls"],
    ),
    "weather": (
        ["rain", "snow", "wind", "storm", "cloud", "sun", "fog", "frost", "thunder", "breeze", "sky", "mist"],
        ["falls", "blows", "clears", "gathers", "rumbles", "lifts"],
    ),
    "food": (
        ["bread", "soup", "cheese", "apple", "rice", "cake", "pie", "tea", "honey", "salad", "pasta", "pear"],
        ["tastes", "cooks", "bakes", "smells", "cools", "melts"],
    ),
    "music": (
        [
            "song",
            "drum",
            "piano",
            "guitar",
            "choir",
            "violin",
            "melody",
            "band",
            "rhythm",
            "flute",
            "singer",
            "concert",
        ],
        ["sounds", "plays", "rings", "hums", "echoes", "swings"],
    ),
    "travel": (
        [
            "train",
            "road",
            "map",
            "ship",
            "hotel",
            "bridge",
            "station",
            "ticket",
            "airport",
            "journey",
            "village",
            "border",
        ],
        ["arrives", "leaves", "crosses", "waits", "winds", "stops"],
    ),
    "garden": (
        ["rose", "tree", "seed", "flower", "grass", "leaf", "root", "bush", "tulip", "soil", "vine", "hedge"],
        ["grows", "blooms", "bends", "spreads", "climbs", "wilts"],
    ),
    "ocean": (
        ["wave", "shell", "boat", "reef", "tide", "whale", "sand", "harbor", "coral", "gull", "island", "current"],
        ["rolls", "crashes", "sails", "sinks", "surges", "ebbs"],
    ),
    "space": (
        [
            "star",
            "moon",
            "planet",
            "comet",
            "rocket",
            "orbit",
            "galaxy",
            "nebula",
            "satellite",
            "astronaut",
            "telescope",
            "meteor",
        ],
        ["spins", "glows", "launches", "fades", "circles", "shines"],
    ),
}
POSITIVE = ["good", "great", "lovely", "wonderful", "bright", "happy", "gentle", "pleasant", "fine", "kind"]
NEGATIVE = ["bad", "awful", "sad", "dull", "gloomy", "nasty", "poor", "ugly", "boring", "terrible"]
NEUTRAL = ["big", "small", "old", "young", "tall", "quiet", "red", "green", "blue", "round", "long", "soft"]
DETERMINERS = ["the", "a", "this", "that"]
NEGATORS = ["not", "never"]
INTENSIFIERS = ["very", "really"]
PREPOSITIONS = ["near", "with", "under", "over", "beside"]
FILLERS = ["well", "um", "so", "ok", "hmm", ","]
TERMINATORS = [".", "?"]
PROMPT_WORDS = ["tell", "me", "about", "describe", "what", "do", "you", "of", "write", "and", "think"]

NOUN_TOPIC: dict[str, str] = {n: t for t, (nouns, _) in TOPICS.items() for n in nouns}
POLARITY: dict[str, float] = {**dict.fromkeys(POSITIVE, 1.0), **dict.fromkeys(NEGATIVE, -1.0)}

# one-letter word classes, used by the grammar check
_CLASS: dict[str, str] = {}
for _words, _c in [
    (DETERMINERS, "D"),
    (POSITIVE + NEGATIVE + NEUTRAL, "A"),
    (list(NOUN_TOPIC), "N"),
    ([v for _, verbs in TOPICS.values() for v in verbs], "V"),
    (["is"], "C"),
    (NEGATORS, "G"),
    (INTENSIFIERS, "I"),
    (PREPOSITIONS, "P"),
    (["i"], "R"),
    (["it"], "K"),
    (["think"], "T"),
]:
    for _w in _words:
        _CLASS.setdefault(_w, _c)
# S := (i think)? NP PRED | it is NEG? INT? ADJ ;  NP := DET ADJ? NOUN ;  PRED := VERB (PREP NP)? | is NEG? INT? ADJ
_NP = "DA?N"
_PRED = f"(?:V(?:P{_NP})?|CG?I?A)"
_SENTENCE = re.compile(f"^(?:(?:RT)?{_NP}{_PRED}|KCG?I?A)$")


def vocabulary() -> list[str]:
    """Every word the task can produce, in a fixed order."""
    words: list[str] = []
    for nouns, verbs in TOPICS.values():
        words += nouns + verbs
    words += POSITIVE + NEGATIVE + NEUTRAL + DETERMINERS + NEGATORS + INTENSIFIERS + PREPOSITIONS + FILLERS
    words += TERMINATORS + PROMPT_WORDS + ["is", "i", "it"]
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------------------------------------------------------
# 2. The gold reward (the judge)
# ---------------------------------------------------------------------------------------------------------------
GOLD_WEIGHTS: dict[str, float] = {
    "coverage": 1.5,  # fraction of the nouns the prompt asks about that the response mentions
    "relevance": 1.0,  # (on-topic - off-topic sentences) / sentences, in [-1, 1]
    "sentiment": 1.0,  # tanh(polarity / 2): warm tone helps, with diminishing returns; "not" flips a word
    "ending": 0.5,  # +1 when the response ends a sentence and stops, -1 when cut off or stopped mid-sentence
    "length": 0.6,  # log(1 + distinct well-formed sentences): more content helps less and less
    "repetition": -2.0,  # fraction of sentences that repeat an earlier one, plus stuttered words
    "grammar": -1.0,  # fraction of sentences (and any unfinished tail) that do not parse
}


def split_sentences(words: list[str]) -> tuple[list[list[str]], list[str]]:
    """Complete sentences (without their terminator) and the unfinished tail after the last terminator."""
    sentences, current = [], []
    for w in words:
        if w in TERMINATORS:
            sentences.append(current)
            current = []
        else:
            current.append(w)
    return sentences, current


def is_well_formed(sentence: list[str]) -> bool:
    return bool(_SENTENCE.match("".join(_CLASS.get(w, "?") for w in sentence)))


def sentence_polarity(sentence: list[str]) -> float:
    """Sum of adjective polarities; a negator earlier in the sentence flips, an intensifier just before scales."""
    total, negated = 0.0, False
    for i, w in enumerate(sentence):
        if w in NEGATORS:
            negated = not negated
        elif w in POLARITY:
            scale = 1.5 if i > 0 and sentence[i - 1] in INTENSIFIERS else 1.0
            total += POLARITY[w] * scale * (-1.0 if negated else 1.0)
    return total


def requested_nouns(prompt: str) -> list[str]:
    return [w for w in prompt.split() if w in NOUN_TOPIC]


def gold_components(prompt: str, response: str, ended: bool = True) -> dict[str, float]:
    """Unweighted gold-reward features of `response` (text after the prompt, without the end token).

    `ended` says whether the response stopped by itself (emitted the end token) rather than being cut off.
    """
    asked = requested_nouns(prompt)
    topic = NOUN_TOPIC[asked[0]] if asked else None
    words = response.split()
    sentences, tail = split_sentences(words)
    n = len(sentences)

    on = off = 0
    for s in sentences:
        topics = {NOUN_TOPIC[w] for w in s if w in NOUN_TOPIC}
        if topics and topics != {topic}:
            off += 1
        elif topics:
            on += 1
    mentioned = {w for s in sentences for w in s}
    coverage = sum(a in mentioned for a in set(asked)) / len(set(asked)) if asked else 0.0

    keys = [" ".join(s) for s in sentences]
    repeats = n - len(set(keys))
    stutters = sum(a == b for a, b in zip(words, words[1:], strict=False) if a not in TERMINATORS)
    good = {k for k, s in zip(keys, sentences, strict=True) if is_well_formed(s)}
    bad = sum(not is_well_formed(s) for s in sentences) + (1 if tail else 0)

    proper_end = ended and not tail and n > 0
    return {
        "coverage": coverage,
        "relevance": (on - off) / max(n, 1),
        "sentiment": math.tanh(sum(sentence_polarity(s) for s in sentences) / 2.0),
        "ending": 1.0 if proper_end else -1.0,
        "length": math.log1p(len(good)),
        "repetition": repeats / max(n, 1) + stutters / max(len(words), 1),
        "grammar": bad / max(n + (1 if tail else 0), 1),
    }


def gold_reward(prompt: str, response: str, ended: bool = True) -> float:
    """r*(prompt, response): the weighted sum of `gold_components`."""
    comps = gold_components(prompt, response, ended)
    return float(sum(GOLD_WEIGHTS[k] * v for k, v in comps.items()))


# ---------------------------------------------------------------------------------------------------------------
# 3. The generator
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    prompt: str
    response: str
    ended: bool = True


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    chosen_ended: bool = True
    rejected_ended: bool = True
    gold_margin: float = 0.0  # r*(chosen) - r*(rejected); negative when the noisy rater disagreed with the gold


@dataclass
class Writer:
    """One demonstrator's habits: the corpus mixes many, so SFT imitates an average, not the best."""

    on_topic: float
    asks_requested: float
    positive: float
    negation: float
    malformed: float
    repeat: float
    truncate: float
    stutter: float
    sentences: tuple[int, int] = field(default=(1, 5))

    @classmethod
    def sample(cls, rng: random.Random) -> Writer:
        return cls(
            on_topic=rng.uniform(0.2, 1.0),
            asks_requested=rng.uniform(0.1, 0.9),
            positive=rng.uniform(0.1, 0.9),
            negation=rng.uniform(0.0, 0.4),
            malformed=rng.uniform(0.0, 0.35),
            repeat=rng.uniform(0.0, 0.35),
            truncate=0.1,
            stutter=rng.uniform(0.0, 0.1),
        )


def _adjective_phrase(rng: random.Random, w: Writer) -> list[str]:
    """'is [not] [very] ADJ' with a sentiment the writer leans to (the judge reads negation correctly)."""
    want_positive = rng.random() < w.positive
    negate = rng.random() < w.negation
    pool = POSITIVE if want_positive != negate else NEGATIVE
    if rng.random() < 0.25:
        pool = NEUTRAL
    out = ["is"] + (["not"] if negate else []) + (["very"] if rng.random() < 0.2 else [])
    return out + [rng.choice(pool)]


def _noun_phrase(rng: random.Random, noun: str) -> list[str]:
    adj = [rng.choice(NEUTRAL + POSITIVE)] if rng.random() < 0.3 else []
    return [rng.choice(DETERMINERS[:2]), *adj, noun]


def _sentence(rng: random.Random, w: Writer, asked: list[str], topic: str) -> list[str]:
    if rng.random() < w.on_topic:
        nouns = asked if rng.random() < w.asks_requested else TOPICS[topic][0]
        t = topic
    else:
        t = rng.choice([x for x in TOPICS if x != topic])
        nouns = TOPICS[t][0]
    noun = rng.choice(nouns)
    kind = rng.random()
    if kind < 0.12:
        s = ["it", *_adjective_phrase(rng, w)]
    elif kind < 0.5:
        s = _noun_phrase(rng, noun) + _adjective_phrase(rng, w)
    elif kind < 0.65:
        s = ["i", "think", *_noun_phrase(rng, noun), *_adjective_phrase(rng, w)]
    else:
        s = _noun_phrase(rng, noun) + [rng.choice(TOPICS[t][1])]
        if rng.random() < 0.4:
            s += [rng.choice(PREPOSITIONS), *_noun_phrase(rng, rng.choice(TOPICS[t][0]))]
    if rng.random() < w.malformed:
        rng.shuffle(s)
        if rng.random() < 0.5:
            s.insert(rng.randrange(len(s) + 1), rng.choice(FILLERS))
    return s + ["."]


class SyntheticTask:
    """Seeded prompts, mixed-quality responses and Bradley–Terry labelled preference pairs."""

    def __init__(self, seed: int = 0, rater_temperature: float = 1.0):
        self.seed = seed
        self.rater_temperature = rater_temperature

    def _rng(self, stream: str) -> random.Random:
        # a separate stream per corpus, so changing one corpus size never changes another corpus
        return random.Random(f"{self.seed}:{stream}")

    @staticmethod
    def sample_prompt(rng: random.Random) -> str:
        topic = rng.choice(list(TOPICS))
        a, b = rng.sample(TOPICS[topic][0], 2)
        form = rng.randrange(5)
        if form == 0:
            return f"tell me about the {a} ."
        if form == 1:
            return f"describe the {a} and the {b} ."
        if form == 2:
            return f"what do you think of the {a} ?"
        if form == 3:
            return f"write about the {rng.choice(NEUTRAL)} {a} ."
        return f"tell me about the {a} and the {b} ."

    @staticmethod
    def sample_response(rng: random.Random, prompt: str, writer: Writer | None = None) -> tuple[str, bool]:
        w = writer or Writer.sample(rng)
        asked = requested_nouns(prompt)
        topic = NOUN_TOPIC[asked[0]]
        words: list[str] = []
        sentences: list[list[str]] = []
        for _ in range(rng.randint(*w.sentences)):
            s = rng.choice(sentences) if sentences and rng.random() < w.repeat else _sentence(rng, w, asked, topic)
            sentences.append(s)
            words += s
        stutter = [word not in TERMINATORS and rng.random() < w.stutter for word in words]
        words = [x for word, st in zip(words, stutter, strict=True) for x in ([word] * (1 + st))]
        ended = True
        if rng.random() < w.truncate and len(words) > 2:
            words = words[: rng.randrange(1, len(words) - 1)]
            ended = False
        return " ".join(words), ended

    def prompts(self, n: int, split: str) -> list[str]:
        rng = self._rng(f"prompts/{split}")
        return [self.sample_prompt(rng) for _ in range(n)]

    def sft_examples(self, n: int) -> list[Example]:
        rng = self._rng("sft")
        out = []
        for _ in range(n):
            p = self.sample_prompt(rng)
            out.append(Example(p, *self.sample_response(rng, p)))
        return out

    def pretrain_documents(self, n: int, chat_share: float = 0.0) -> list[str]:
        """Plain text: prompts and runs of sentences, as a base model would read. `chat_share` of them (drawn from
        their own stream, so the plain documents stay the same) are instead a prompt and its answer in the chat format
        the later stages use (`<user> prompt <assistant> answer`; the document's end token closes the answer)."""
        rng, chat = self._rng("pretrain"), self._rng("pretrain/chat")
        docs = []
        for _ in range(n):
            p = self.sample_prompt(rng)
            text, _ = self.sample_response(rng, p)
            plain = f"{p} {text}" if rng.random() < 0.3 else text
            docs.append(f"<user> {p} <assistant> {text}" if chat_share and chat.random() < chat_share else plain)
        return docs

    def preference_pairs(self, n: int, split: str) -> list[Pair]:
        """Two responses per prompt; the rater prefers a with probability sigmoid((r*(a) - r*(b)) / temperature)."""
        rng = self._rng(f"pairs/{split}")
        out = []
        for _ in range(n):
            p = self.sample_prompt(rng)
            (a, ea), (b, eb) = self.sample_response(rng, p), self.sample_response(rng, p)
            margin = gold_reward(p, a, ea) - gold_reward(p, b, eb)
            p_a = 1.0 / (1.0 + math.exp(-margin / self.rater_temperature))
            if rng.random() < p_a:
                out.append(Pair(p, a, b, ea, eb, margin))
            else:
                out.append(Pair(p, b, a, eb, ea, -margin))
        return out
