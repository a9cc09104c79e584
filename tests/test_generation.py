"""Sampling, masks and scalar heads: what PPO and evaluation build on."""

import torch

from salsa.data.synthetic import SyntheticTask
from salsa.functional import token_logprobs
from salsa.models.actors import response_logits
from salsa.models.generation import decode, encode_prompts, response_mask, sample
from salsa.models.hf import (
    last_index,
    load_reward_model,
    position_ids_from_mask,
    sequence_scores,
    tiny_gemma,
    train_word_tokenizer,
)
from salsa.models.sampler import bucket_prompts, cache_length
from tests.hub_fixtures import peaked


def _tiny_model(tok):
    torch.manual_seed(0)
    return tiny_gemma(
        tok,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
    )


def _tiny(tmp_path):
    task = SyntheticTask(0)
    tok = train_word_tokenizer([f"{e.prompt} {e.response}" for e in task.sft_examples(300)])
    model = _tiny_model(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tok, model.eval()


def test_response_mask_hand_case():
    eos = 2
    resp = torch.tensor([[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    mask, ended = response_mask(resp, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]
    # a pad token equal to eos (Llama-style) after the first eos stays outside the mask
    mask2, _ = response_mask(torch.tensor([[5, 2, 2, 2]]), eos)
    assert mask2.tolist() == [[1, 1, 0, 0]]


def test_last_index():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    assert last_index(mask).tolist() == [4, 2, 3]


def test_sampled_logprobs_match_a_full_forward_pass(tmp_path):
    """The logprobs kept from generation (left padding, KV cache) equal a fresh forward pass over the sequences."""
    tok, model = _tiny(tmp_path)
    prompts = ["tell me about the fox .", "describe the rain and the snow .", "what do you think of the comet ?"]
    query, qmask = encode_prompts(tok, prompts, 32)
    assert (qmask[:, 0] == 0).any()  # prompts of different lengths: left padding is exercised
    torch.manual_seed(0)
    s = sample(model, tok, query, qmask, max_new_tokens=10, temperature=0.7)
    with torch.no_grad():
        full = token_logprobs(response_logits(model, s.sequences, s.attention_mask, query.size(1)), s.response, 0.7)
    torch.testing.assert_close(s.logprobs, full * s.response_mask, rtol=1e-4, atol=1e-4)
    assert torch.all(s.response[s.response_mask == 0] == tok.pad_token_id)
    texts = decode(tok, s)
    assert len(texts) == 3 and all("<eos>" not in t and "<pad>" not in t for t in texts)


def test_sequence_scores_do_not_depend_on_padding(tmp_path):
    tok, _ = _tiny(tmp_path)
    rm = load_reward_model(tmp_path).eval()
    ids = tok("the fox runs .", add_special_tokens=False)["input_ids"]
    right = torch.tensor([ids + [tok.pad_token_id] * 3])
    left = torch.tensor([[tok.pad_token_id] * 3 + ids])
    with torch.no_grad():
        a = sequence_scores(rm, right, (right != tok.pad_token_id).long())
        b = sequence_scores(rm, left, (left != tok.pad_token_id).long())
        c = sequence_scores(rm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)


def test_response_logits_equal_the_full_forward_pass_sliced(tmp_path):
    """Keeping only the response positions' logits (no LM head over the prompt) changes no number."""
    tok, model = _tiny(tmp_path)
    seq = torch.randint(6, len(tok), (3, 9))
    mask = torch.ones_like(seq)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        got = response_logits(model, seq, mask, prompt_len=4)
    assert got.shape == (3, 5, len(tok))
    torch.testing.assert_close(got, full[:, 3:-1], rtol=1e-5, atol=1e-6)


def test_step_by_step_logprobs_equal_the_kept_logits_path(tmp_path):
    """Sampling with one step's distribution in memory gives the same tokens and log-probabilities, under a fixed
    seed, as generation that keeps every step's logits (the former path, 12 bytes × batch × length × vocabulary)."""
    from transformers import GenerationConfig

    tok, model = _tiny(tmp_path)
    prompts = ["tell me about the fox .", "describe the rain and the snow .", "what do you think of the comet ?"]
    query, qmask = encode_prompts(tok, prompts, 32)
    for temperature, do_sample in ((0.7, True), (1.0, True), (1.0, False)):
        torch.manual_seed(3)
        s = sample(model, tok, query, qmask, max_new_tokens=12, temperature=temperature, do_sample=do_sample)
        torch.manual_seed(3)
        cfg = GenerationConfig(
            max_new_tokens=12, do_sample=do_sample, temperature=temperature if do_sample else None,
            top_k=0 if do_sample else None, top_p=1.0 if do_sample else None, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        with torch.no_grad():
            kept = model.generate(input_ids=query, attention_mask=qmask, generation_config=cfg)
        response = kept.sequences[:, query.size(1) :]
        mask, _ = response_mask(response, tok.eos_token_id)
        assert torch.equal(s.response[mask.bool()], response[mask.bool()])
        expected = token_logprobs(torch.stack(kept.logits, dim=1), response, temperature) * mask
        torch.testing.assert_close(s.logprobs, expected, rtol=1e-5, atol=1e-6)


def test_row_chunks_hand_case():
    from salsa.models.actors import row_chunks

    # 10 positions × 100 vocabulary × 8 bytes = 8000 bytes a row: 3 rows fit 24,000 bytes, never fewer than one
    assert row_chunks(7, 10, 100, budget=24_000) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert row_chunks(2, 10, 100, budget=1) == [slice(0, 1), slice(1, 2)]
    assert row_chunks(2, 10, 100, budget=10**9) == [slice(0, 2)]


def _peaked_tiny(tok):
    return peaked(_tiny_model(tok), tok.eos_token_id, layer_scale=10.0, eos_scale=4.0)


def test_bucket_prompts_pads_on_the_left():
    query, mask = torch.tensor([[0, 7, 8], [6, 7, 8]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    q, m = bucket_prompts(query, mask, pad_id=0, multiple=4)
    assert q.tolist() == [[0, 0, 7, 8], [0, 6, 7, 8]] and m.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert bucket_prompts(q, m, pad_id=0, multiple=4)[0] is q  # already a multiple: unchanged
    assert cache_length(32, 40) == 96 and cache_length(32, 64) == 96


def test_compiled_sampler_matches_eager():
    """Static cache + compiled decode step (float32, CPU): greedy tokens identical to the eager sampler's, with left
    padding and rows that end early; sampled tokens carry log-probs equal to a teacher-forced rescoring; and a
    batch of another prompt width in the same bucket reuses the compiled graph."""
    tok = train_word_tokenizer([f"{e.prompt} {e.response}" for e in SyntheticTask(0).sft_examples(300)])
    model = _peaked_tiny(tok)
    prompts = [
        "tell me about the fox .",
        "describe the rain and the snow .",
        "what do you think of the comet ?",
        "why ?",
    ]
    query, qmask = encode_prompts(tok, prompts, 32)
    assert (qmask[:, 0] == 0).any()

    eager = sample(model, tok, query, qmask, max_new_tokens=12, do_sample=False)
    compiled = sample(model, tok, query, qmask, max_new_tokens=12, do_sample=False, compiled=True)
    ended_early = eager.response_mask.sum(1) < eager.response.size(1)
    assert ended_early.any() and not ended_early.all()  # the case the masks must get right
    assert torch.equal(compiled.query, query) and torch.equal(compiled.response, eager.response)
    assert torch.equal(compiled.response_mask, eager.response_mask) and torch.equal(compiled.ended, eager.ended)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, rtol=1e-4, atol=1e-4)

    torch.manual_seed(3)
    drawn = sample(model, tok, query, qmask, max_new_tokens=12, temperature=0.7, compiled=True)
    with torch.no_grad():
        rescored = token_logprobs(
            response_logits(model, drawn.sequences, drawn.attention_mask, query.size(1)), drawn.response, 0.7
        )
    torch.testing.assert_close(drawn.logprobs, rescored * drawn.response_mask, rtol=1e-4, atol=1e-4)
    assert torch.all(drawn.response[drawn.response_mask == 0] == tok.pad_token_id)
    torch.manual_seed(3)
    drawn_eagerly = sample(model, tok, query, qmask, max_new_tokens=12, temperature=0.7)
    assert torch.equal(drawn.response, drawn_eagerly.response)  # same seed, same draws (float32 differences aside)

    narrower, nmask = encode_prompts(tok, ["why ?", "the fox .", "the rain .", "tell me ."], 32)
    assert narrower.size(1) < query.size(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = sample(model, tok, narrower, nmask, max_new_tokens=12, do_sample=False, compiled=True)
    assert torch.equal(again.response, sample(model, tok, narrower, nmask, 12, do_sample=False).response)
