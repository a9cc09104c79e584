"""Evaluation: responses to held-out prompts from the policy and its baselines, judged side by side.

Each model answers every held-out prompt `samples_per_prompt` times with the same sampling seed. Answers are scored
by the reward model and, on a task with a gold reward (the embedded task, IFEval), by the gold reward, which is then
the judge of the paper's adjusted win rate (wins + ½ ties) / comparisons. `kl_to_ref` is the mean over the policy's
answers of Σ_t log π/π_ref. A task with metrics of its own (`TaskData.metrics`: IFEval's strict accuracies) reports
them for each model, named `<metric>_policy`, `<metric>_sft` and `<metric>_ppo` (the baseline).
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import numpy as np
import torch

from salsa.config import rollout_config
from salsa.data.task import judge_answers
from salsa.data.tokens import pad_right, prompt_ids, report_long_prompts, response_ids
from salsa.functional import adjusted_win_rate
from salsa.infra.cache import Entry
from salsa.infra.context import Context, log, plain
from salsa.infra.progress import track
from salsa.models.engines import HFEngine, make_engine
from salsa.models.generation import decode, encode_prompts
from salsa.models.hf import load_reward_model, load_tokenizer, response_positions, sequence_scores
from salsa.stages.base import stage_loader
from salsa.stages.rm import judge_kind

EXPORT_KEYS = ("export", "answers")  # settings of the export stage, which do not change the evaluation


@torch.no_grad()
def answer(
    model, tokenizer, prompts: list[str], e, reward_model, reference=None, name: str = "model", judge_model=None,
    engine=None,
) -> dict:  # fmt: skip
    """Sample answers in batches (with `engine`, else the model itself: `salsa.models.engines`); return texts, ended
    flags, RM scores, (with a reference) sequence KLs and (with a judge reward model on the same tokenizer) the
    judge's scores. KLs use the model's own log-probs of its answers, whichever engine drew them."""
    from salsa.models.actors import response_logits, scored_logprobs

    engine = engine if engine is not None else HFEngine(e.compile_sampler)
    engine.sync(model)
    torch.manual_seed(e.seed)  # every model sees the same sampling noise
    texts, ended, scores, kls, judged = [], [], [], [], []
    for i in track(range(0, len(prompts), e.batch_size), f"[eval] {name}: generating"):
        chunk = prompts[i : i + e.batch_size]
        query, mask = encode_prompts(tokenizer, chunk, e.max_prompt_length, next(model.parameters()).device)
        s = engine.sample(tokenizer, query, mask, e.response_length, e.temperature, e.do_sample)
        texts += decode(tokenizer, s)
        ended += s.ended.tolist()
        answer_tokens = response_positions(s.response_mask, s.sequences.size(1))
        scores += sequence_scores(reward_model, s.sequences, s.attention_mask, answer_tokens).tolist()
        if judge_model is not None:
            judged += sequence_scores(judge_model, s.sequences, s.attention_mask, answer_tokens).tolist()
        if reference is not None:
            temp = e.temperature if e.do_sample else 1.0
            vocab = reference.config.vocab_size
            ref_logp = scored_logprobs(
                partial(response_logits, reference), s.sequences, s.attention_mask, s.response, temp, vocab
            )
            own = s.logprobs
            if not engine.exact_logprobs:
                own = scored_logprobs(
                    partial(response_logits, model), s.sequences, s.attention_mask, s.response, temp, vocab
                )
            kls += ((own - ref_logp) * s.response_mask).sum(1).tolist()
    out = {"texts": texts, "ended": ended, "rm": scores, "kl": kls}
    return {**out, "judge": judged} if judge_model is not None else out


class TextJudge:
    """A sequence-classification reward model from a local directory, with its own tokenizer: it reads each answer's
    text (prompt through its chat template, response closed by its EOS when the answer ended), as an external judge
    would, so it need not share the policy's tokenizer or base."""

    def __init__(self, path: str, device, max_prompt: int, max_response: int, batch_size: int = 16):
        self.tokenizer = load_tokenizer(path)
        self.model = load_reward_model(path).to(device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_prompt, self.max_response, self.batch_size = max_prompt, max_response, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], texts: list[str], ended: list[bool]) -> list[float]:
        tok, device, scores = self.tokenizer, next(self.model.parameters()).device, []
        for i in range(0, len(prompts), self.batch_size):
            parts = [
                (prompt_ids(tok, p, self.max_prompt), response_ids(tok, t, e)[: self.max_response])
                for p, t, e in zip(prompts[i : i + self.batch_size], texts[i : i + self.batch_size],
                                   ended[i : i + self.batch_size], strict=True)
            ]  # fmt: skip
            ids = pad_right([q + r for q, r in parts], tok.pad_token_id).to(device)
            mask = pad_right([[1] * (len(q) + len(r)) for q, r in parts], 0).to(device)
            answer_tokens = pad_right([[0] * len(q) + [1] * len(r) for q, r in parts], 0).to(device)
            scores += sequence_scores(self.model, ids, mask, answer_tokens).tolist()
        return scores


def run_eval(
    ctx: Context,
    policy: Entry,
    sft0: Entry,
    baseline: Entry | None,
    rm: Entry,
    reference: Entry,
    judge_rm: Entry | None = None,
) -> Entry:
    """The policy, SFT ingredient 0 and the baseline answer the held-out prompts; the judge (`eval.judge`: the gold
    reward, a held-out reward model `judge_rm`, the policy's reward model, or a local reward model) scores them for
    the adjusted win rates."""
    cfg = ctx.cfg
    kind = judge_kind(cfg, ctx.data)
    judge_id = {"heldout_rm": judge_rm.key if judge_rm else None, "rm": rm.key}.get(
        kind, None if kind == "gold" else kind
    )
    spec = {
        "policy": policy.key, "sft": sft0.key, "baseline": baseline.key if baseline else None, "rm": rm.key,
        "reference": reference.key, "data": plain(cfg.data), "judge": judge_id,
        "eval": {k: v for k, v in plain(cfg.eval).items() if k not in (*EXPORT_KEYS, "compile_sampler")},
        **({"compiled_sampler": True} if cfg.eval.get("compile_sampler") else {}),  # in the key only when on
        **rollout_config(cfg).key(),  # the engine too: only when it is not hf
    }  # fmt: skip

    def build(work: Path, run_id: str | None) -> dict:
        e = cfg.eval
        data = ctx.data
        prompts = [p for p in data.prompts_eval for _ in range(e.samples_per_prompt)]
        tok = load_tokenizer(policy.path)
        report_long_prompts(tok, data.prompts_eval, e.max_prompt_length, "eval.max_prompt_length")
        loader = stage_loader(ctx)  # full checkpoints, or adapters on one shared base
        reward_model = loader.reward(rm.path)
        ref_model = loader.causal(reference.path)
        judge_model = loader.reward(judge_rm.path) if kind == "heldout_rm" else None
        text_judge = (
            TextJudge(kind, ctx.device, e.max_prompt_length, cfg.rm.max_response_length)
            if kind not in ("gold", "rm", "heldout_rm")
            else None
        )
        models = {"policy": policy, "sft": sft0, **({"ppo": baseline} if baseline else {})}
        answers = {}
        engine = None  # one engine for the three models: each is pushed into it in turn
        try:
            for name, entry in models.items():
                model = loader.causal(entry.path)
                if engine is None:
                    max_len = e.max_prompt_length + e.response_length
                    engine = make_engine(rollout_config(cfg), model, max_len, compiled=e.compile_sampler, seed=e.seed)
                answers[name] = answer(
                    model, tok, prompts, e, reward_model, ref_model if name == "policy" else None, name, judge_model,
                    engine,
                )  # fmt: skip
        finally:
            if engine is not None:
                engine.close()
        for name in models:
            a = answers[name]
            if data.judge is not None:
                a["gold"] = judge_answers(data.judge, prompts, a["texts"], a["ended"])
            if text_judge is not None:
                a["judge"] = text_judge(prompts, a["texts"], a["ended"])
            elif kind != "heldout_rm":
                a["judge"] = a["gold" if kind == "gold" else "rm"]
        judge = "judge"

        def win_rate(other: str) -> float | None:
            if other not in answers:
                return None
            return adjusted_win_rate(
                torch.tensor(answers["policy"][judge]), torch.tensor(answers[other][judge]), e.tie_tolerance
            )

        results = {
            "win_rate_vs_sft": win_rate("sft"),
            "win_rate_vs_ppo": win_rate("ppo"),
            "gold_reward": float(np.mean(answers["policy"]["gold"])) if "gold" in answers["policy"] else None,
            "rm_reward": float(np.mean(answers["policy"]["rm"])),
            "kl_to_ref": float(np.mean(answers["policy"]["kl"])),
            "judge": kind if kind in ("gold", "rm", "heldout_rm") else f"path:{kind}",
            "judge_model": judge_id,
            "judge_reward": float(np.mean(answers["policy"]["judge"])),
            "ended_frac": float(np.mean(answers["policy"]["ended"])),
            "comparisons": len(prompts),
        }
        if data.metrics is not None:  # the task's own metrics of each model's answers (IFEval's strict accuracies)
            for name, a in answers.items():
                results.update({f"{k}_{name}": v for k, v in data.metrics(prompts, a["texts"], a["ended"]).items()})
        for name in ("sft", "ppo"):
            if name in answers:
                results[f"{name}_rm_reward"] = float(np.mean(answers[name]["rm"]))
                if "gold" in answers[name]:
                    results[f"{name}_gold_reward"] = float(np.mean(answers[name]["gold"]))
                if kind not in ("gold", "rm"):
                    results[f"{name}_judge_reward"] = float(np.mean(answers[name]["judge"]))
        if not any(e for a in answers.values() for e in a["ended"]):
            log.warning("[eval] no answer ended within eval.response_length=%d tokens: the judge scores cut answers "
                        "only (a gold reward that needs an ended answer, as IFEval's, gives every one 0); raise "
                        "ppo.response_length, which eval.response_length follows", e.response_length)  # fmt: skip
        if judge_rm is not None:
            results["judge_accuracy"] = judge_rm.manifest.get("metrics", {}).get("accuracy")
        with open(work / "generations.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["prompt", "model", "response", "ended", "rm_reward", "gold_reward", "judge_reward"])
            for name, a in answers.items():
                for i, p in enumerate(prompts):
                    writer.writerow(
                        [
                            p,
                            name,
                            a["texts"][i],
                            a["ended"][i],
                            round(a["rm"][i], 4),
                            round(a["gold"][i], 4) if "gold" in a else "",
                            round(a["judge"][i], 4),
                        ]
                    )
        log.info("[eval] %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()})
        return {"metrics": {k: v for k, v in results.items() if isinstance(v, int | float)}, "results": results}

    return ctx.build("eval", spec, build)
