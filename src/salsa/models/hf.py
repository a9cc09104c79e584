"""Tokenizers and models: the embedded tiny Gemma and loading of Hugging Face checkpoints.

Everything saved here is plain Hugging Face format (safetensors + config), loadable without this project.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GemmaConfig,
    GemmaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
# one user turn, then the assistant's answer closed by <eos>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
    "{% else %}<assistant> {{ m['content'] }} {{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def train_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on the task's text, wrapped as a Hugging Face tokenizer with a chat template."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # special tokens written in the text (chat-format documents) are already in the vocabulary: counted again as
    # words, they would leave holes in the ids (ids past the vocabulary's size)
    special = set(SPECIAL_TOKENS)
    words = (" ".join(w for w in t.split() if w not in special) for t in texts)
    tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<user>", "<assistant>"],
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_gemma(tokenizer, **arch) -> GemmaForCausalLM:
    """A small Gemma-architecture causal LM sized by `arch` (hidden_size, num_hidden_layers, ...)."""
    config = GemmaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **arch,
    )
    return GemmaForCausalLM(config)


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False, revision: str | None = None):
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token_id is None:  # Llama/Mistral ship without a pad token
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, **config
):
    """A causal LM from a safetensors checkpoint. `config` overrides config fields before the layers are built
    (e.g. attention_dropout: setting it on `model.config` afterwards would not reach the layers)."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **config
    )


def load_reward_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, **config
):
    """A scalar-head (*ForSequenceClassification) model from a safetensors checkpoint; `config` as above."""
    return AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **config
    )


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Scalar heads (reward model, value function) and position ids for padded batches
# ---------------------------------------------------------------------------------------------------------------
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (as `generate` computes them), so a sequence scores the same padded or not."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def scalar_head_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token outputs (batch, time) of a `*ForSequenceClassification` model's scalar head.

    Used for rewards (read at the last token) and values (read at every token). The backbone and head are called
    directly so the score position comes from the attention mask, not from where pad tokens are.
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


@torch.no_grad()
def scale_score_head(model, factor: float) -> None:
    """Multiply the scalar head (`score`, weight and any bias; both copies of a peft module to save) by `factor`,
    which multiplies every score and value the model gives, whichever way they are pooled. A head sharded by FSDP2
    (`salsa.models.sharding`) is resharded first: a trained root unit stays gathered after its forward, and its
    gathered copy is only a view that the next reshard throws away."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model.score, FSDPModule):
        model.score.reshard()
    for p in model.score.parameters():
        p.mul_(factor)


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token of each row (works for left and right padding)."""
    t = attention_mask.size(1)
    return t - 1 - attention_mask.flip(-1).long().argmax(-1)


SCORE_POOLINGS = ("last", "mean")


def pool_scores(
    outputs: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None, pooling: str = "last"
) -> torch.Tensor:
    """One scalar per sequence from per-token head outputs (batch, time): `last` reads the last attended token (the
    convention of Hugging Face's sequence classifiers and of RLHF engines); `mean` averages over the response tokens
    (`response_mask`, same shape, 1 on the response), which a small model learns from more easily than a summary
    in one position. A row without response tokens scores 0 under `mean`."""
    if pooling == "last":
        return outputs.gather(1, last_index(attention_mask).unsqueeze(1)).squeeze(1)
    if pooling != "mean":
        raise ValueError(f"score pooling must be one of {SCORE_POOLINGS}, got {pooling!r}")
    if response_mask is None:
        raise ValueError("mean score pooling needs the response tokens' mask")
    m = response_mask.to(outputs.dtype)
    return (outputs * m).sum(1) / m.sum(1).clamp(min=1)


def score_pooling(model) -> str:
    """How a reward model's sequence score is read: `score_pooling` in its config (written by the `rm` stage with
    `rm.score`), else the last token."""
    return getattr(getattr(model, "config", None), "score_pooling", None) or "last"


def response_positions(response_mask: torch.Tensor, width: int) -> torch.Tensor:
    """A response mask over the last positions of sequences `width` long (a rollout: query, then response) widened
    to the whole sequence."""
    return torch.nn.functional.pad(response_mask, (width - response_mask.size(1), 0))


def sequence_scores(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One scalar per sequence, read as the model's config says (`score_pooling`): the head's output at the last
    attended token, or its mean over the response tokens (`response_mask`, same shape as `input_ids`)."""
    out = scalar_head_outputs(model, input_ids, attention_mask)
    return pool_scores(out, attention_mask, response_mask, score_pooling(model))
