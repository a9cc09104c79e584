"""The policy's answers to MT-Bench or Arena-Hard questions, written in the files those benchmarks' judges read.

- MT-Bench (FastChat `llm_judge`): questions `{"question_id", "category", "turns": [str, ...]}`; answers
  `data/mt_bench/model_answer/<model_id>.jsonl` with `{"question_id", "answer_id", "model_id",
  "choices": [{"index": 0, "turns": [str, ...]}], "tstamp"}`. Later turns see the earlier answers.
- Arena-Hard v0.1 (`arena-hard-auto`): questions `{"question_id", "category", "turns": [{"content": str}]}`; answers
  as above with `"turns": [{"content": str}]` and `"conv_metadata"` (length and markdown counts, for style control).
  Arena-Hard v2 question files (`{"uid", "category", "prompt"}`) get v2 answers: `{"uid", "ans_id", "model",
  "messages": [user, {"role": "assistant", "content": {"answer": str}}], "tstamp", "metadata"}`.
Question ids are kept as they are in the question file.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from salsa.config import BENCHMARKS
from salsa.errors import SalsaError

# FastChat's sampling temperature per MT-Bench category (0 = greedy); other categories use the configured one
CATEGORY_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
CODE_BLOCK = re.compile(r"```([^`]*)```")


class ExportError(SalsaError, ValueError):
    """A question file or setting the export cannot use."""


# ---------------------------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------------------------
def read_questions(path: str | os.PathLike, benchmark: str) -> list[dict[str, Any]]:
    if benchmark not in BENCHMARKS:
        raise ExportError(f"eval.export must be one of {BENCHMARKS}, got {benchmark!r}")
    path = Path(path) if path else None
    if path is None or not path.is_file():
        raise ExportError(f"eval.answers.questions must name the benchmark's question.jsonl, got {path}")
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, q in enumerate(questions):
        question_turns(q, f"{path}:{i + 1}")  # validates the schema
    return questions


def question_turns(question: dict[str, Any], where: str = "question") -> list[str]:
    """The user turns of a question in any of the supported schemas."""
    if "prompt" in question and "uid" in question:  # Arena-Hard v2
        return [question["prompt"]]
    if "question_id" not in question or not isinstance(question.get("turns"), list) or not question["turns"]:
        raise ExportError(f"{where}: expected 'question_id' and a non-empty 'turns' list (or 'uid' and 'prompt')")
    return [t["content"] if isinstance(t, dict) else t for t in question["turns"]]


def question_temperature(question: dict[str, Any], default: float) -> float:
    return CATEGORY_TEMPERATURE.get(question.get("category", ""), default)


# ---------------------------------------------------------------------------------------------------------------
# Conversations and answer records
# ---------------------------------------------------------------------------------------------------------------
def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """Headers, lists and bold spans outside code blocks: the style features Arena-Hard's style control reads."""
    text = CODE_BLOCK.sub("", text)
    return {
        "header_count": {f"h{n}": len(re.findall(rf"^#{{{n}}}\s", text, re.MULTILINE)) for n in range(1, 7)},
        "list_count": {
            "ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
            "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE)),
        },
        "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)), "__": len(re.findall(r"__[^_\n]+__", text))},
    }


def answer_record(
    benchmark: str, question: dict[str, Any], answers: list[str], model_id: str, token_len: int
) -> dict[str, Any]:
    """One line of the benchmark's model_answer file."""
    now = time.time()
    if benchmark == "mt_bench":
        return {
            "question_id": question["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": answers}],
            "tstamp": now,
        }
    metadata = {"token_len": token_len, **markdown_counts(answers[-1])}
    if "uid" in question:  # Arena-Hard v2
        return {
            "uid": question["uid"],
            "ans_id": uuid.uuid4().hex,
            "model": model_id,
            "messages": [
                {"role": "user", "content": question["prompt"]},
                {"role": "assistant", "content": {"answer": answers[-1]}},
            ],
            "tstamp": now,
            "metadata": metadata,
        }
    return {
        "question_id": question["question_id"],
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": [{"content": a} for a in answers]}],
        "tstamp": now,
        "conv_metadata": metadata,
    }


def answer_file(out_dir: str | os.PathLike, benchmark: str, model_id: str) -> Path:
    """Where the judge looks, relative to its data directory: <benchmark>/model_answer/<model_id>.jsonl."""
    return Path(out_dir) / benchmark / "model_answer" / f"{model_id}.jsonl"
