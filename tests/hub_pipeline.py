"""`experiment=paper_gemma2b` end to end on a Gemma-shaped local checkpoint and UltraFeedback-format files with
over-long prompts, recording what the hub-path checks need. The CPU test and the GPU check run the same code at
different sizes."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.conftest import make_cfg
from tests.hub_fixtures import gemma_checkpoint, long_prompt_rows, write_jsonl


@dataclass
class Observed:
    cfg: Any
    results: dict[str, Any]
    entries: list
    tokenizer: Any
    queries: list[tuple[list[int], int | None, int]] = field(default_factory=list)  # (ids, max_length, full length)
    head_inits: list[torch.Tensor] = field(default_factory=list)  # reward heads as they were before training
    loads: list = field(default_factory=list)  # the 4-bit base loads of the run

    def stage(self, name: str) -> list:
        return [e for e in self.entries if e.stage == name]

    def first_ppo_kl(self) -> float:
        """ppo/kl of the first iteration of the run's policy (its sequence KL to the reference, before any update)."""
        policy = self.stage("ppo")[0]
        with open(policy.path / "history.csv", newline="") as f:
            return float(next(csv.DictReader(f))["ppo/kl"])

    def trained_heads(self) -> list[torch.Tensor]:
        """The saved reward heads (policy's reward model, then the judge), in the order they were built."""
        heads = []
        for e in self.stage("rm"):
            tensors = load_file(e.path / "adapter_model.safetensors")
            heads.append(next(v for k, v in tensors.items() if k.endswith("score.weight")))
        return heads


def run_paper_gemma2b(
    root: Path, monkeypatch, checkpoint: dict[str, Any], *overrides: str, rows: int = 16, answer_words: int = 0
) -> Observed:
    """Build the checkpoint and data under `root`, run the pipeline of `experiment=paper_gemma2b` (plus `overrides`)
    in-process, and record every prompt's token ids, the reward heads' initial weights and the base loads.
    `answer_words`: answers that long (past the response limit), so SFT and the reward model train at full length."""
    from salsa.data import tokens
    from salsa.infra.context import Context
    from salsa.models import qlora
    from salsa.pipeline import run

    ckpt = gemma_checkpoint(root / "gemma", **checkpoint)
    data = root / "ultrafeedback"
    for split in ("train_sft", "test_sft", "train_prefs", "test_prefs"):
        write_jsonl(data / f"{split}.jsonl", long_prompt_rows(rows, words=300, answer_words=answer_words))
    observed = Observed(None, {}, [], None)

    real_chat_ids = tokens.chat_ids

    def recording_chat_ids(tokenizer, messages, max_length=None):
        ids = real_chat_ids(tokenizer, messages, max_length)
        observed.queries.append((ids, max_length, len(real_chat_ids(tokenizer, messages))))
        return ids

    real_head = qlora.float32_head

    def recording_head(model):
        real_head(model)
        observed.head_inits.append(model.score.weight.detach().clone().cpu())

    monkeypatch.setattr(tokens, "chat_ids", recording_chat_ids)
    monkeypatch.setattr(qlora, "float32_head", recording_head)
    loads_before = len(qlora.LOADED)
    cfg = make_cfg(
        root / "logs", "experiment=paper_gemma2b", f"model.name_or_path={ckpt}", f"data.path={data}", "logger=none",
        "extras.progress_bar=false", *overrides, debug=False,
    )  # fmt: skip
    ctx = Context.from_cfg(cfg)
    observed.results = run(cfg, ctx)
    observed.cfg, observed.entries, observed.tokenizer = cfg, ctx.entries, tokens_of(ckpt)
    observed.loads = qlora.LOADED[loads_before:]
    return observed


def tokens_of(ckpt: Path):
    from salsa.models.hf import load_tokenizer

    return load_tokenizer(ckpt)


# the counts of a small run; lengths, learning rates and batch sizes stay the preset's (the paper's)
FEW = [
    "data.task.n_sft=16", "data.task.n_sft_val=8", "data.task.n_pairs=16", "data.task.n_pairs_val=8",
    "data.task.n_prompts=16", "data.task.n_eval_prompts=8",
]  # fmt: skip
