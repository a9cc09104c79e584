"""Export: the policy's answers to a benchmark's questions, in the files its official judge reads (salsa.export)."""

from __future__ import annotations

from pathlib import Path

from salsa.cache import Entry
from salsa.context import Context, log, plain
from salsa.export import export_answers, read_questions
from salsa.lora import model_loader
from salsa.models import load_tokenizer


def run_export(ctx: Context, policy: Entry) -> Entry:
    cfg = ctx.cfg
    e = cfg.eval
    questions = read_questions(e.answers.questions, e.export)  # fail before anything is loaded
    spec = {
        "policy": policy.key, "benchmark": e.export, "answers": plain(e.answers), "questions": questions,
        "max_prompt_length": e.max_prompt_length, "seed": e.seed,
    }  # fmt: skip

    def build(work: Path, run_id: str | None) -> dict:
        a = e.answers
        model = model_loader(cfg.model, ctx.device).causal(policy.path)
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
        )
        log.info("[export] %d %s answers written to %s", len(questions), e.export, path)
        return {"file": str(path.relative_to(work)), "benchmark": e.export, "model_id": a.model_id}

    return ctx.build("export", spec, build)
