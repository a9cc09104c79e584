"""The whole pipeline at debug sizes through the real entry point: results.json, the table, MLflow runs."""

import json

import pytest
from mlflow.tracking import MlflowClient

from salsa.runner import pipeline_job
from tests.conftest import make_cfg

pytestmark = pytest.mark.slow

CONTRACT_KEYS = {"win_rate_vs_sft", "win_rate_vs_ppo", "gold_reward", "rm_reward", "kl_to_ref", "judge"}


def test_results_json_and_mlflow(shared_cache, capsys):
    cfg = make_cfg(shared_cache, "logger=mlflow")
    pipeline_job(cfg)
    results = json.loads((shared_cache / "out" / "results.json").read_text())
    assert set(results) >= CONTRACT_KEYS
    assert results["judge"] == "gold"
    for key in ("win_rate_vs_sft", "win_rate_vs_ppo"):
        assert 0.0 <= results[key] <= 1.0
    assert isinstance(results["gold_reward"], float) and isinstance(results["kl_to_ref"], float)
    assert "win_rate_vs_sft" in capsys.readouterr().out  # the printed table

    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    exp = client.get_experiment_by_name(cfg.logger.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    for key in CONTRACT_KEYS - {"judge", "win_rate_vs_ppo"}:
        assert parent.data.metrics[f"eval/{key}"] == pytest.approx(results[key])
    assert parent.data.metrics["eval/win_rate_vs_ppo"] == pytest.approx(results["win_rate_vs_ppo"])
    assert parent.data.params["ref.name"] == "soup3"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # stages that were already in the cache (built by other tests) are tagged on the parent, not re-run
    built = {r.data.tags["stage"] for r in children}
    reused = {k.split(".")[1] for k in parent.data.tags if k.startswith("reused.")}
    assert {"ppo", "eval"} <= built | reused and {"base", "sft", "rm"} <= built | reused
    ppo_runs = [r for r in children if r.data.tags["stage"] == "ppo"]
    for r in ppo_runs:
        history = client.get_metric_history(r.info.run_id, "ppo/gold_reward")
        assert [m.step for m in history] == list(range(cfg.ppo.iterations))


def test_plain_ppo_has_no_ppo_baseline(shared_cache):
    cfg = make_cfg(shared_cache, "ref=sft")
    pipeline_job(cfg)
    results = json.loads((shared_cache / "out" / "results.json").read_text())
    assert results["win_rate_vs_ppo"] is None and results["ref"] == "sft"
    assert 0.0 <= results["win_rate_vs_sft"] <= 1.0


def test_a_local_reward_model_can_judge(shared_cache, tmp_path):
    """`eval.judge=/path` scores the answers' text with that model and its own tokenizer (here a different
    vocabulary from the policy's); only the evaluation is redone, and results.json names the judge."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from salsa.infra.context import Context
    from salsa.pipeline import run
    from tests.hub_fixtures import arch_config, word_tokenizer

    tok = word_tokenizer(chat_template=True, pad=True)
    torch.manual_seed(0)
    config = arch_config("llama", len(tok), tok)
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    cfg = make_cfg(shared_cache, f"eval.judge={tmp_path / 'judge'}")
    ctx = Context.from_cfg(cfg)
    results = run(cfg, ctx)
    assert results["judge"] == f"path:{tmp_path / 'judge'}" and results["judge_model"] == str(tmp_path / "judge")
    assert 0.0 <= results["win_rate_vs_sft"] <= 1.0 and isinstance(results["judge_reward"], float)
    assert results["gold_reward"] is not None  # the gold reward is still reported beside the chosen judge
    assert "eval" in [e.stage for e in ctx.entries if not e.reused]
