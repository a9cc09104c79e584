"""Samples: the base model's own answers to a task's training prompts, judged by its gold reward (rejection sampling).

A task that makes its SFT data and preference pairs from the model itself (`data=ifeval`) comes without them: its
`TaskData.needs_samples` (a `SampleRequest`) says which prompts to answer, how often and how. This stage runs after
`base` and before `sft`: the base model (for a checkpoint preset, the pretrained instruct model) answers the prompts
with its own sampler (`HFEngine`, `salsa.models.engines`), every answer is judged by the gold reward, and the answers
are written to `samples.jsonl`, one line per prompt:

    {"prompt": ..., "samples": [{"text": ..., "ended": true, "gold": 0.5}, ...]}

`complete_data` then replaces `ctx.data` with the task the request's `complete` makes of them. Tasks without a
request skip the stage, and no other stage's key changes: each already holds the base's key and the data config,
which determine the answers. That is why `rollout=` does not apply here: another engine would draw other answers
under the same SFT and reward-model keys.

The key is the base's key, the task's name, what the request determines the answers by (`request_spec`: a hash of
the prompts and their numbers of answers, the temperature, the token budget, the batch size and the seed; for
data=ifeval the data config's `seed`, `n_sft`, `n_sft_val`, `n_pairs`, `n_pairs_val`, `samples_per_prompt`,
`sample_temperature`, `max_new_tokens`, `sample_batch_size` and the prompt-drawing keys). A sweep over anything else
(the SFT, reward-model and PPO settings, the seeds of the ingredients, the rater's temperature, the PPO and
evaluation prompts, the rollout engine) reuses the answers. Answers are written batch by batch into the
build's `.partial` directory, every batch sampled with its own seed, so an interrupted build resumes at the first
unfinished batch and ends with the answers an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from salsa.data.task import Answer, SampleRequest
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log
from salsa.infra.progress import track
from salsa.models.engines import HFEngine
from salsa.models.generation import decode, encode_prompts
from salsa.models.hf import load_causal_lm, load_tokenizer
from salsa.models.qlora import BaseSettings, base_tokenizer, uses_adapters
from salsa.stages.base import base_settings

FILE = "samples.jsonl"  # the finished answers, one line per prompt
BATCHES = "batches.jsonl"  # the build's progress, one line per finished batch (removed when the build ends)

# (the batch's prompts, its seed) -> (texts, ended): one answer per prompt
Sampler = Callable[[list[str], int], tuple[list[str], list[bool]]]


def answer_rows(request: SampleRequest) -> list[str]:
    """The prompt of every answer to draw: prompt i `request.n[i]` times in a row."""
    return [p for p, n in zip(request.prompts, request.n, strict=True) for _ in range(n)]


def batch_seed(seed: int, index: int) -> int:
    """The torch seed of batch `index`: a batch's answers do not depend on the batches drawn before it."""
    return seed * 1_000_003 + index


def request_spec(request: SampleRequest) -> dict:
    """What determines the answers, for the stage's key: the prompts and how often each is answered (one hash of
    both, in order) and the sampling settings. The rest of the data config (the rater, the PPO and evaluation
    prompts, how the answers are used) stays out: changing it reuses the answers."""
    digest = hashlib.sha256(json.dumps([request.prompts, request.n]).encode()).hexdigest()
    return {
        "prompts": digest, "answers": sum(request.n), "temperature": request.temperature,
        "max_new_tokens": request.max_new_tokens, "batch_size": request.batch_size, "seed": request.seed,
    }  # fmt: skip


def read_batches(path: Path) -> dict[int, dict]:
    """The finished batches of an interrupted build, by index; a last line torn by the interruption is ignored."""
    done: dict[int, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[int(row["batch"])] = row
    return done


def group_answers(request: SampleRequest, texts: Sequence[str], ended: Sequence[bool], gold: Sequence[float]):
    """The answers of the flat rows (`answer_rows`) grouped per prompt: `[[(text, ended, gold), ...], ...]`."""
    rows = list(zip(texts, (bool(e) for e in ended), (float(g) for g in gold), strict=True))
    out, start = [], 0
    for n in request.n:
        out.append(rows[start : start + n])
        start += n
    return out


def write_samples(path: Path, prompts: Sequence[str], answers: Sequence[Sequence[Answer]]) -> None:
    """`samples.jsonl`: one line per prompt with its answers."""
    with open(path, "w") as f:
        for prompt, group in zip(prompts, answers, strict=True):
            samples = [{"text": t, "ended": e, "gold": g} for t, e, g in group]
            f.write(json.dumps({"prompt": prompt, "samples": samples}) + "\n")


def read_samples(path: Path, prompts: Sequence[str]) -> list[list[Answer]]:
    """The answers in `samples.jsonl`, checked to be those to `prompts`, in order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if [r["prompt"] for r in rows] != list(prompts):
        raise RuntimeError(f"{path} holds answers to other prompts than the task's: its key does not match its data")
    return [[(s["text"], bool(s["ended"]), float(s["gold"])) for s in r["samples"]] for r in rows]


@contextlib.contextmanager
def model_sampler(ctx: Context, base: Entry, request: SampleRequest) -> Iterator[Sampler]:
    """A `Sampler` that answers with the base model's own sampler (`HFEngine`): the base's checkpoint (full
    fine-tuning, or a packaged GGUF copy), or the frozen base without adapters (LoRA presets)."""
    cfg = ctx.cfg
    if uses_adapters(cfg.model):
        from salsa.models.shared_base import SharedBase

        settings = base_settings(ctx)
        inference = BaseSettings(**{**settings.__dict__, "gradient_checkpointing": False})
        tokenizer, model = base_tokenizer(settings), SharedBase.load(inference, ctx.device).causal([]).eval()
    else:
        tokenizer, model = load_tokenizer(base.path), load_causal_lm(base.path).to(ctx.device).eval()
    engine = HFEngine()
    engine.sync(model)

    def sample(prompts: list[str], seed: int) -> tuple[list[str], list[bool]]:
        query, mask = encode_prompts(tokenizer, prompts, None, ctx.device)  # whole prompts: the answer is to them
        torch.manual_seed(seed)
        s = engine.sample(tokenizer, query, mask, request.max_new_tokens, request.temperature, True)
        return decode(tokenizer, s), s.ended.tolist()

    try:
        yield sample
    finally:
        engine.close()


def draw(work: Path, request: SampleRequest, sample: Sampler, judge: Callable[[str, str, bool], float]) -> dict:
    """Every answer of `request`, batch by batch, each batch judged and appended to `work/BATCHES` (finished batches
    of an interrupted build are kept); then `work/FILE`. Returns the build's metrics."""
    rows = answer_rows(request)
    size = request.batch_size
    progress = work / BATCHES
    done = read_batches(progress)
    if done:
        log.info("[samples] resuming: %d of %d batches already drawn", len(done), -(-len(rows) // size))
    progress.write_text("".join(json.dumps(done[b]) + "\n" for b in sorted(done)))  # without a torn last line
    with open(progress, "a") as f:
        for b, start in enumerate(track(range(0, len(rows), size), "[samples] answering")):
            if b in done:
                continue
            prompts = rows[start : start + size]
            texts, ended = sample(prompts, batch_seed(request.seed, b))
            gold = [judge(p, t, bool(e)) for p, t, e in zip(prompts, texts, ended, strict=True)]
            done[b] = {"batch": b, "texts": texts, "ended": [bool(e) for e in ended], "gold": gold}
            f.write(json.dumps(done[b]) + "\n")
            f.flush()
            os.fsync(f.fileno())
    texts, ended, gold = [], [], []
    for b in range(len(done)):
        texts += done[b]["texts"]
        ended += done[b]["ended"]
        gold += done[b]["gold"]
    if len(texts) != len(rows):
        raise RuntimeError(f"{progress}: {len(texts)} answers for {len(rows)} rows (batch size changed?)")
    write_samples(work / FILE, request.prompts, group_answers(request, texts, ended, gold))
    progress.unlink()
    best = [max(g for _, _, g in group) for group in group_answers(request, texts, ended, gold)]
    return {
        "prompts": len(request.prompts),
        "answers": len(rows),
        "ended_frac": sum(ended) / len(rows),
        "gold_mean": sum(gold) / len(rows),
        "scored_frac": sum(g > 0 for g in gold) / len(rows),
        "best_gold_mean": sum(best) / len(best),
    }


def run_samples(ctx: Context, base: Entry) -> Entry:
    """The base model's judged answers to the prompts of the task's `SampleRequest` (cached)."""
    cfg, data = ctx.cfg, ctx.data
    request = data.needs_samples
    if request is None:
        raise ValueError(f"data={cfg.data.name} asks for no samples")
    if data.judge is None:
        raise ValueError(f"data={cfg.data.name} asks for samples but has no gold reward to judge them")
    spec = {"base": base.key, "task": cfg.data.name, "request": request_spec(request)}

    def build(work: Path, run_id: str | None) -> dict:
        log.info("[samples] %d answers to %d prompts, temperature %g, at most %d new tokens", sum(request.n),
                 len(request.prompts), request.temperature, request.max_new_tokens)  # fmt: skip
        with model_sampler(ctx, base, request) as sample:
            metrics = draw(work, request, sample, data.judge)
        log.info("[samples] %s", {k: round(v, 4) for k, v in metrics.items()})
        return {"metrics": metrics, "file": FILE, "base": base.key}

    return ctx.build("samples", spec, build)


def complete_data(ctx: Context, base: Entry) -> Entry | None:
    """Where the task asks for the base model's answers (`TaskData.needs_samples`): draw them (`run_samples`) and
    replace `ctx.data` with the completed task. Returns the samples' entry; None (and nothing done) for other tasks
    and once the task is complete."""
    request = ctx.data.needs_samples
    if request is None:
        return None
    entry = run_samples(ctx, base)
    data = request.complete(read_samples(entry.path / FILE, request.prompts))
    log.info("[samples] SFT examples %d train / %d val; preference pairs %d train / %d val (of %d prompts answered)",
             len(data.sft_train), len(data.sft_val), len(data.pairs_train), len(data.pairs_val),
             len(request.prompts))  # fmt: skip
    ctx.data = data
    return entry
