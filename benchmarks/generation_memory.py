"""Generation memory at a real vocabulary: peak RSS of sampling `--batch` × `--length` tokens from a 2-layer Gemma
with Gemma's 256k vocabulary, two ways, each in a process of its own.

- kept: Hugging Face `generate` with `output_logits=True`, then one log-softmax over the stacked logits (the
  pipeline's former sampler: every step's float32 logits stay alive until the end);
- steps: `salsa.models.generation.sample`, which keeps only the sampled token's log-probability of each step.

`baseline` builds the model and samples one token: the floor under both. Growth = peak − baseline. The workers run
with glibc's mmap threshold fixed at 128 KiB: otherwise its dynamic threshold keeps freed per-step buffers in the
heap, and peak RSS wanders by hundreds of MiB from run to run without any tensor being alive.

    python benchmarks/generation_memory.py                     # 8 × 256 tokens, vocabulary 256,000
    python benchmarks/generation_memory.py --length 64 --smoke  # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import human_bytes, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def worker(mode: str, batch: int, length: int, vocab: int, hidden: int) -> None:
    """Build the model (seeded), sample, print a checksum of the tokens and log-probabilities."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, GenerationConfig

    sys.path.insert(0, str(ROOT / "src"))
    from salsa.functional import token_logprobs
    from salsa.models.generation import response_mask, sample

    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    )  # fmt: skip
    model = GemmaForCausalLM(config).eval()

    class Tok:  # the three ids sampling needs
        pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    query = torch.randint(3, vocab, (batch, 16))
    mask = torch.ones_like(query)
    torch.manual_seed(1)
    if mode == "baseline":
        out = sample(model, Tok, query, mask, max_new_tokens=1)
        checksum = float(out.logprobs.sum())
    elif mode == "steps":
        out = sample(model, Tok, query, mask, max_new_tokens=length)
        checksum = float(out.logprobs.sum())
    else:
        cfg = GenerationConfig(
            max_new_tokens=length, do_sample=True, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=1,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        with torch.no_grad():
            gen = model.generate(input_ids=query, attention_mask=mask, generation_config=cfg)
        response = gen.sequences[:, query.size(1) :]
        resp_mask, _ = response_mask(response, 1)
        checksum = float((token_logprobs(torch.stack(gen.logits, dim=1), response) * resp_mask).sum())
    print(json.dumps({"mode": mode, "checksum": checksum}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="a small vocabulary and short answers")
    parser.add_argument("--json", help="also write the table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.vocab, args.length, args.hidden = 4096, min(args.length, 16), 64
    sizes = [str(args.batch), str(args.length), str(args.vocab), str(args.hidden)]
    if args.worker:
        worker(args.worker, *map(int, sizes))
        return {}
    results = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    flags = sum(([f"--{k}", v] for k, v in zip(("batch", "length", "vocab", "hidden"), sizes, strict=True)), [])
    for mode in ("baseline", "kept", "steps"):
        m = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", mode, *flags], env=env)
        if m.returncode:
            raise SystemExit(f"{mode} failed:\n{m.output[-2000:]}")
        out = json.loads(m.output.strip().splitlines()[-1])
        results[mode] = {"peak_rss": m.peak_rss_bytes, "wall_s": round(m.wall_s, 1), **out}
    floor = results["baseline"]["peak_rss"]
    table = {
        "setting": f"batch {args.batch} x {args.length} tokens, vocabulary {args.vocab}, 2 layers, width {args.hidden}",
        "kept_growth": human_bytes(max(0, results["kept"]["peak_rss"] - floor)),
        "steps_growth": human_bytes(max(0, results["steps"]["peak_rss"] - floor)),
        "logits_kept_bytes_expected": human_bytes(12 * args.batch * args.length * args.vocab),
        # the same seed samples the same tokens: their summed log-probabilities agree to float precision
        "same_samples": math.isclose(results["kept"]["checksum"], results["steps"]["checksum"], rel_tol=1e-4),
        "runs": results,
    }
    print(json.dumps(table, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
