"""Export: the policy's answers to a benchmark's questions, in the files its official judge reads (the
formats: `salsa.data.benchmarks`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from salsa.config import rollout_config
from salsa.data.benchmarks import (
    answer_file,
    answer_record,
    question_temperature,
    question_turns,
    read_questions,
)
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.models.engines import make_engine
from salsa.models.hf import load_tokenizer
from salsa.stages.base import stage_loader


def export_answers(
    model,
    tokenizer,
    questions: list[dict[str, Any]],
    benchmark: str,
    model_id: str,
    out_dir: str | os.PathLike,
    max_new_tokens: int = 1024,
    temperature: float = 0.0,
    batch_size: int = 16,
    max_prompt_length: int | None = None,
    seed: int = 0,
    engine=None,
) -> Path:
    """Answer every turn of every question (turn j sees the answers to turns < j) and write the answer file;
    `engine` samples (`salsa.models.engines`; the model itself by default)."""
    import torch

    from salsa.data.tokens import chat_ids, pad_left
    from salsa.models.engines import HFEngine
    from salsa.models.generation import decode

    engine = engine if engine is not None else HFEngine()
    engine.sync(model)
    device = next(model.parameters()).device
    turns = [question_turns(q) for q in questions]
    answers: list[list[str]] = [[] for _ in questions]
    lengths = [0] * len(questions)
    torch.manual_seed(seed)
    for j in range(max(len(t) for t in turns)):
        todo = [i for i, t in enumerate(turns) if len(t) > j]
        by_temp: dict[float, list[int]] = {}
        for i in todo:
            by_temp.setdefault(question_temperature(questions[i], temperature), []).append(i)
        for temp, idx in sorted(by_temp.items()):
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                ids = []
                for i in chunk:
                    messages = []
                    for k in range(j):
                        messages += [
                            {"role": "user", "content": turns[i][k]},
                            {"role": "assistant", "content": answers[i][k]},
                        ]
                    messages.append({"role": "user", "content": turns[i][j]})
                    ids.append(chat_ids(tokenizer, messages, max_prompt_length))
                query = pad_left(ids, tokenizer.pad_token_id).to(device)
                mask = pad_left([[1] * len(x) for x in ids], 0).to(device)
                s = engine.sample(tokenizer, query, mask, max_new_tokens, temp if temp > 0 else 1.0, temp > 0)
                for i, text, n in zip(chunk, decode(tokenizer, s), s.lengths.tolist(), strict=True):
                    answers[i].append(text)
                    lengths[i] = int(n)
    path = answer_file(out_dir, benchmark, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for q, a, n in zip(questions, answers, lengths, strict=True):
            f.write(json.dumps(answer_record(benchmark, q, a, model_id, n), ensure_ascii=False) + "\n")
    return path


def run_export(ctx: Context, policy: Entry) -> Entry:
    cfg = ctx.cfg
    e = cfg.eval
    questions = read_questions(e.answers.questions, e.export)  # fail before anything is loaded
    spec = {
        "policy": policy.key, "benchmark": e.export, "answers": plain(e.answers), "questions": questions,
        "max_prompt_length": e.max_prompt_length, "seed": e.seed, **rollout_config(cfg).key(),
    }  # fmt: skip

    def build(work: Path, run_id: str | None) -> dict:
        a = e.answers
        model = stage_loader(ctx).causal(policy.path)
        max_len = (e.max_prompt_length or 0) + a.max_new_tokens
        engine = make_engine(rollout_config(cfg), model, max_len, seed=e.seed)
        try:
            path = export_answers(
                model,
                load_tokenizer(policy.path),
                questions,
                e.export,
                a.model_id,
                work,
                max_new_tokens=a.max_new_tokens,
                temperature=a.temperature,
                batch_size=a.batch_size,
                max_prompt_length=e.max_prompt_length,
                seed=e.seed,
                engine=engine,
            )
        finally:
            engine.close()
        log.info("[export] %d %s answers written to %s", len(questions), e.export, path)
        return {"file": str(path.relative_to(work)), "benchmark": e.export, "model_id": a.model_id}

    return ctx.build("export", spec, build)
