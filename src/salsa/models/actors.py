"""The models of RLHF behind one interface: policy and value (trained), reference and reward (frozen).

`FullActors` holds separate full-weight models (the tiny default). The QLoRA layout, where all share one frozen base
through adapters, implements the same methods, so an algorithm's module never knows which it has. PPO uses all four;
GRPO and RLOO have no value model; DPO has neither value nor reward model.
"""

from __future__ import annotations

import torch
from torch import nn

from salsa.functional import ema_update, token_logprobs
from salsa.models.hf import position_ids_from_mask, response_positions, scalar_head_outputs, sequence_scores
from salsa.models.sharding import save_pretrained, shard_model


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits that predict the response tokens: positions prompt_len-1 .. T-2 of the full sequence.

    Only the last T - prompt_len + 1 positions go through the LM head (`logits_to_keep`): the prompt's logits are
    never used, and over a large vocabulary the LM head is one of the model's largest matmuls.
    """
    keep = sequences.size(1) - prompt_len + 1
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=keep,
    ).logits
    return logits[:, :-1]


SCORING_BUDGET = 1024**3  # bytes of logits (and their float32 log-softmax) a scoring pass holds at a time


def row_chunks(rows: int, positions: int, vocab: int, budget: int = SCORING_BUDGET) -> list[slice]:
    """Slices of a batch to score a few rows at a time: each row's logits over `positions` response positions take
    8 bytes × positions × vocabulary with their log-softmax (2 GiB for 8 × 256 tokens at Gemma's 256k vocabulary)."""
    size = max(1, min(rows, budget // max(1, positions * vocab * 8)))
    return [slice(i, i + size) for i in range(0, rows, size)]


def scored_logprobs(
    logits_of, sequences: torch.Tensor, attention_mask: torch.Tensor, response: torch.Tensor, temperature: float,
    vocab: int,
) -> torch.Tensor:  # fmt: skip
    """(B, R) log-probabilities of the sampled `response` tokens under `logits_of(sequences, attention_mask,
    prompt_len)` (a reference's `response_logits`), scored a few rows at a time (`row_chunks`), so full-vocabulary
    logits never cover the whole batch."""
    prompt_len = sequences.size(1) - response.size(1)
    return torch.cat([
        token_logprobs(logits_of(sequences[r], attention_mask[r], prompt_len), response[r], temperature)
        for r in row_chunks(sequences.size(0), response.size(1), vocab)
    ])  # fmt: skip


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class FullActors(nn.Module):
    def __init__(
        self, policy: nn.Module, value: nn.Module | None, reference: nn.Module, reward: nn.Module | None = None
    ):
        super().__init__()
        self.policy, self.value = policy, value
        self.reference = freeze(reference)
        self.reward = freeze(reward) if reward is not None else None

    def models(self) -> list[nn.Module]:
        return [m for m in (self.policy, self.value, self.reference, self.reward) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.reference, self.reward):  # frozen models never enter train mode
            if frozen is not None:
                frozen.eval()
        return self

    @property
    def generator(self) -> nn.Module:
        return self.policy

    def policy_logits(self, sequences, attention_mask, prompt_len):
        return response_logits(self.policy, sequences, attention_mask, prompt_len)

    def reference_logits(self, sequences, attention_mask, prompt_len):
        return response_logits(self.reference, sequences, attention_mask, prompt_len)

    def values(self, sequences, attention_mask, prompt_len):
        """V(s_t) for the state before each response token."""
        return scalar_head_outputs(self.value, sequences, attention_mask)[:, prompt_len - 1 : -1]

    def scores(self, sequences, attention_mask, response_mask):
        """The reward model's score of each rollout; `response_mask` (batch, response length) marks the answer's
        tokens, which a mean-pooled reward model averages over."""
        return sequence_scores(
            self.reward, sequences, attention_mask, response_positions(response_mask, sequences.size(1))
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.policy, self.value) if m is not None for p in m.parameters() if p.requires_grad]

    @torch.no_grad()
    def move_reference(self, rate: float) -> None:
        """reference ← (1 − rate) · reference + rate · policy, parameter by parameter (`ref.update`)."""
        policy = dict(self.policy.named_parameters())
        for name, ref in self.reference.named_parameters():
            ref.copy_(ema_update(ref.float(), policy[name].float(), rate).to(ref.dtype))

    def shard(self, mesh) -> None:
        """FSDP2 (`trainer=fsdp2`): shard every model over the data-parallel `mesh` (`salsa.models.sharding`); the
        frozen reference and reward model too, so that no rank holds a whole model outside sampling and scoring.
        The reference is sharded as the policy is, so a moving reference mixes the two shard by shard."""
        for model in self.models():
            shard_model(model, mesh)

    def compile(self) -> None:
        """`torch.compile` each model's decoder in place (state-dict keys unchanged), with dynamic shapes: every
        rollout's prompt width differs, and scoring and the update run different batch sizes. The LM head and the
        scalar heads stay eager, and so does sampling (`salsa.models.generation.sample`): its growing KV cache would
        recompile at every step."""
        for model in self.models():
            getattr(model, model.base_model_prefix).compile(dynamic=True)

    def save_policy(self, path) -> None:
        """The policy as a Hugging Face checkpoint; a sharded one is gathered and written by rank 0 alone."""
        save_pretrained(self.policy, path)
