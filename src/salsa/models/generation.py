"""Sampling responses for a batch of prompts, shared by PPO rollouts and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from salsa.data.tokens import pad_left, prompt_ids
from salsa.models.sampler import bucket_prompts, cache_length, compile_config
from salsa.models.sharding import gathered, without_grad_of


@dataclass
class Samples:
    """Left-padded queries and right-padded responses; `response_mask` covers tokens up to the first end token."""

    query: torch.Tensor  # (B, P) token ids, left padded
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    response: torch.Tensor  # (B, R) token ids, pad after the end token
    response_mask: torch.Tensor  # (B, R) float, 1 up to and including the first end token
    ended: torch.Tensor  # (B,) bool: the response emitted the end token
    logprobs: torch.Tensor  # (B, R) log π_T(token) under the sampling policy at the sampling temperature

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)


def encode_prompts(tokenizer, prompts: list[str], max_length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [prompt_ids(tokenizer, p, max_length) for p in prompts]
    query = pad_left(ids, tokenizer.pad_token_id)
    mask = pad_left([[1] * len(i) for i in ids], 0)
    return query.to(device), mask.to(device)


def response_mask(response: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1.0 on tokens up to and including the first `eos_id`, and whether each row contains one."""
    is_eos = (response == eos_id).long()
    before = (is_eos.cumsum(1) - is_eos) == 0
    return before.float(), is_eos.bool().any(1)


class SampledLogprobs(LogitsProcessor):
    """Records, step by step, the log-probability of each sampled token under the sampling distribution.

    Generation calls processors with the step's raw float32 logits before temperature is applied, and with the
    tokens sampled so far: at each step the previous step's distribution gives the log-probability of the token just
    sampled. Only one step's distribution (batch × vocabulary) is alive at a time, so memory does not grow with
    response length × vocabulary (keeping every step's logits took 12 bytes × batch × length × vocabulary: 6 GiB at
    8 × 256 tokens of Gemma's 256k vocabulary).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # (B, V) log-probabilities of the last step
        self.steps: list[torch.Tensor] = []

    def _take(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.previous.gather(1, tokens[:, None]).squeeze(1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, R) log-probabilities of the R sampled tokens, once generation has returned `sequences`."""
        if self.previous is not None:
            self._take(sequences[:, -1])
            self.previous = None
        return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((sequences.size(0), 0)).float()


def _generation_config(tokenizer, max_new_tokens: int, temperature: float, do_sample: bool) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=0 if do_sample else None,  # sample from the policy itself, not a truncated version of it
        top_p=1.0 if do_sample else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
        return_dict_in_generate=True,
    )


def _static(gen_cfg: GenerationConfig, prompt_width: int, device: torch.device) -> GenerationConfig:
    """The compiled sampler's settings: a static cache of a bucketed length, and a compiled decode step."""
    gen_cfg.cache_implementation = "static"
    gen_cfg.max_cache_len = cache_length(prompt_width, gen_cfg.max_new_tokens)
    gen_cfg.compile_config = compile_config(device)
    return gen_cfg


@without_grad_of(lambda model: [model])  # inference mode, or no-grad on sharded weights
def sample(
    model,
    tokenizer,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    do_sample: bool = True,
    compiled: bool = False,
) -> Samples:
    """Sample (or greedily decode) responses with the KV cache; logprobs come from the generation's own logits
    (`SampledLogprobs`), so no second policy forward pass is needed. Tokens after the end token become padding.
    A sharded model samples on its gathered weights (`salsa.models.sharding`: ranks stop at different lengths).

    `compiled`: a static KV cache and a torch.compile'd decode step (`salsa.models.sampler`), prompts left-padded to
    a bucketed width so graphs are reused across calls. The returned `query` is the caller's, unpadded."""
    was_training = model.training
    model.eval()
    gen_cfg = _generation_config(tokenizer, max_new_tokens, temperature, do_sample)
    inputs, inputs_mask = query, query_mask
    if compiled:
        inputs, inputs_mask = bucket_prompts(query, query_mask, tokenizer.pad_token_id)
        gen_cfg = _static(gen_cfg, inputs.size(1), query.device)
    recorder = SampledLogprobs(temperature if do_sample else 1.0)
    # eager: a compiled decoder (ppo.compile) would recompile as the dynamic cache grows, so it runs eagerly here
    stance = "default" if compiled else "force_eager"
    with torch.compiler.set_stance(stance), gathered(model):
        out = model.generate(
            input_ids=inputs,
            attention_mask=inputs_mask,
            generation_config=gen_cfg,
            logits_processor=LogitsProcessorList([recorder]),
        )
    model.train(was_training)
    response = out.sequences[:, inputs.size(1) :]
    logprobs = recorder.finish(out.sequences)
    mask, ended = response_mask(response, tokenizer.eos_token_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    return Samples(query, query_mask, response, mask, ended, logprobs * mask)


def decode(tokenizer, samples: Samples) -> list[str]:
    """Response texts without the end token or padding."""
    texts = []
    for row, m in zip(samples.response.tolist(), samples.response_mask.tolist(), strict=True):
        ids = [t for t, keep in zip(row, m, strict=True) if keep and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts
