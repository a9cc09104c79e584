"""Local stand-ins for hub models and datasets: tiny Gemma/Llama/Mistral checkpoints and data files in the real
schemas, written into temp dirs (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GemmaConfig, LlamaConfig, MistralConfig, PreTrainedTokenizerFast

from salsa.models.hf import CHAT_TEMPLATE

WORDS = (
    "how do i bake bread write a poem about the sea explain why the sky is blue give me three tips for sleeping "
    "well sure here is a short answer first mix flour and water then wait the sea is wide and deep light scatters "
    "in the air go to bed early avoid screens keep a routine thank you i am not sure what is the capital of france "
    "paris is the capital human assistant hello can you help me please yes of course no sorry"
).split()
ARCHS = ("gemma", "llama", "mistral")


def word_tokenizer(chat_template: bool, pad: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS. Llama- and Mistral-like ones have no chat template and no pad token."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        **({"pad_token": "<pad>"} if pad else {}),
    )
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def arch_config(arch: str, vocab_size: int, tok) -> object:
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_position_embeddings": 256,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if arch == "gemma":
        return GemmaConfig(num_attention_heads=2, num_key_value_heads=1, head_dim=32, **common)
    if arch == "llama":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common)
    if arch == "mistral":
        return MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=128, **common)
    raise ValueError(arch)


def tiny_checkpoint(path: Path, arch: str = "gemma", seed: int = 0) -> Path:
    """A randomly initialised tiny checkpoint + tokenizer saved like a hub model (safetensors, config, tokenizer)."""
    from transformers import AutoModelForCausalLM

    tok = word_tokenizer(chat_template=arch == "gemma", pad=arch == "gemma")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(arch_config(arch, len(tok), tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Data files in the hub datasets' schemas
# ---------------------------------------------------------------------------------------------------------------
PROMPTS = [
    "how do i bake bread",
    "write a poem about the sea",
    "explain why the sky is blue",
    "give me three tips for sleeping well",
    "what is the capital of france",
    "can you help me please",
]
GOOD = [
    "first mix flour and water then wait",
    "the sea is wide and deep",
    "light scatters in the air",
    "go to bed early avoid screens keep a routine",
    "paris is the capital",
    "yes of course",
]
BAD = ["no sorry", "i am not sure", "hello", "no", "i am not sure what is", "sorry"]


def _messages(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def ultrafeedback_rows(n: int) -> list[dict]:
    """Rows of HuggingFaceH4/ultrafeedback_binarized (prompt, prompt_id, chosen, rejected, messages, scores)."""
    rows = []
    for i in range(n):
        p, good, bad = PROMPTS[i % len(PROMPTS)], GOOD[i % len(GOOD)], BAD[i % len(BAD)]
        rows.append(
            {
                "prompt": p,
                "prompt_id": f"id{i}",
                "chosen": _messages(p, good),
                "rejected": _messages(p, bad),
                "messages": _messages(p, good),
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
        )
    return rows


def hh_rlhf_rows(n: int) -> list[dict]:
    """Rows of Anthropic/hh-rlhf: `chosen` and `rejected` transcripts that differ in the last assistant turn."""
    rows = []
    for i in range(n):
        p, good, bad = PROMPTS[i % len(PROMPTS)], GOOD[i % len(GOOD)], BAD[i % len(BAD)]
        history = "\n\nHuman: hello\n\nAssistant: hello can you help me" if i % 2 else ""
        rows.append(
            {
                "chosen": f"{history}\n\nHuman: {p}\n\nAssistant: {good}",
                "rejected": f"{history}\n\nHuman: {p}\n\nAssistant: {bad}",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def ultrafeedback_dir(root: Path, n: int = 24, fmt: str = "jsonl") -> Path:
    write = write_jsonl if fmt == "jsonl" else write_parquet
    for split in ("train_sft", "test_sft", "train_prefs", "test_prefs"):
        write(root / f"{split}.{fmt}", ultrafeedback_rows(n))
    return root


def hh_rlhf_dir(root: Path, n: int = 24, fmt: str = "jsonl") -> Path:
    write = write_jsonl if fmt == "jsonl" else write_parquet
    for split in ("train", "test"):
        write(root / f"{split}.{fmt}", hh_rlhf_rows(n))
    return root


# ---------------------------------------------------------------------------------------------------------------
# Gemma-shaped checkpoints: Gemma's special tokens and chat template, any width, depth and vocabulary
# ---------------------------------------------------------------------------------------------------------------
GEMMA_TEMPLATE = (  # google/gemma-2b-it's chat template
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0-3 as in Gemma


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Gemma's special tokens (pad 0, eos 1, bos 2) and chat template."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = " ".join([*WORDS, "user", "model"])
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=GEMMA_SPECIALS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"], clean_up_tokenization_spaces=False,
    )  # fmt: skip
    hf.chat_template = GEMMA_TEMPLATE
    return hf


def gemma_checkpoint(
    path: Path, vocab: int = 256_000, hidden: int = 64, layers: int = 2, intermediate: int = 128, heads: int = 2,
    head_dim: int = 32, dtype: torch.dtype = torch.float32,
) -> Path:  # fmt: skip
    """A randomly initialised Gemma (Gemma-2B's vocabulary by default, any width and depth) saved like the hub's,
    with the Gemma-shaped tokenizer; the model's vocabulary may exceed the tokenizer's, as Gemma's does."""
    from transformers import GemmaConfig, GemmaForCausalLM

    tok = gemma_tokenizer()
    config = GemmaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim, hidden_act="gelu_pytorch_tanh",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GemmaForCausalLM(config).to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def long_prompt_rows(n: int, words: int, answer_words: int = 0) -> list[dict]:
    """UltraFeedback rows whose prompts run to about `words` words (over any 256-token limit); with `answer_words`,
    every answer (chosen, rejected, SFT) runs that long too, so the stages see their full configured lengths."""
    rows = ultrafeedback_rows(n)
    for i, r in enumerate(rows):
        filler = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
        prompt = f"{filler} {r['prompt']}"
        r["prompt"] = prompt
        for key in ("chosen", "rejected", "messages"):
            r[key][0]["content"] = prompt
            if answer_words:
                answer = " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(answer_words))
                r[key][1]["content"] = f"{r[key][1]['content']} {answer}"
    return rows


@torch.no_grad()
def peaked(model, eos_id: int, layer_scale: float, eos_scale: float):
    """`model` (a tiny Gemma, tied head) made to give greedy answers that vary and sometimes end: at initialisation
    the residual stream echoes the last prompt token, so the layers' weights are scaled up, and the end token's
    embedding (tied to the LM head) too."""
    for p in model.model.layers.parameters():
        if p.dim() == 2:
            p.mul_(layer_scale)
    model.get_input_embeddings().weight[eos_id] *= eos_scale
    return model.eval()


def adapter_view(
    ckpt: Path, quant: str, names: list[str], scale: float, seed: int = 0, active: list[str] | None = None,
    device: str = "cpu",
):  # fmt: skip
    """A shared base (`quant`: none | nf4) from `ckpt` holding one fresh adapter per name, each with B drawn from
    N(0, scale²) so it changes the model; returns (shared base, the causal view with `active` (default: all) on)."""
    from salsa.models.qlora import BaseSettings
    from salsa.models.shared_base import SharedBase

    settings = BaseSettings(name_or_path=str(ckpt), quant=quant, gradient_checkpointing=False)
    shared = SharedBase.load(settings, device)
    torch.manual_seed(seed)
    for name in names:
        shared.new_adapter(name, settings.lora)
        with torch.no_grad():
            for pname, p in shared.lm.named_parameters():
                if f"lora_B.{name}." in pname:
                    p.normal_(0, scale)
    return shared, shared.causal(active if active is not None else names)
