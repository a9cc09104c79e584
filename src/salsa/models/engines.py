"""Rollout engines: what samples answers for PPO, GRPO, RLOO and evaluation (`rollout.engine`).

One interface, three implementations:
  `engine.sync(model)`   the weights to sample from (a causal LM, or a view of adapters on a shared base);
  `engine.sample(...)`   prompts (left-padded token ids), max new tokens, temperature → `Samples` (tokens, the
                         sampling distribution's log-probs, ended flags), the same structure whichever engine drew it.

`hf` samples with the training model itself (`salsa.models.generation.sample`): its log-probs are the training
model's own, so PPO's ratio is exact as drawn. `hf_merged` samples with a plain copy of it (adapters merged, 4-bit
weights dequantised). `vllm` samples with a vLLM engine colocated in this process: weights
are pushed into it before every rollout (`push_weights`), and its log-probs are its own arithmetic's (paged
attention, other kernels), so the algorithms recompute the behaviour log-probs with the training model
(`exact_logprobs` is False) and log the gap between the two. Both sample in bfloat16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salsa.errors import SalsaError
from salsa.models.generation import Samples, response_mask, sample
from salsa.models.qlora import compute_dtype
from salsa.validate import VLLM_INSTALL as _VLLM_INSTALL
from salsa.validate import vllm_installed as vllm_available

log = logging.getLogger("salsa")
VLLM_INSTALL = "rollout.engine=" + _VLLM_INSTALL


class EngineError(SalsaError, RuntimeError):
    """A rollout engine that cannot run here, or a weight push that did not take."""


# ---------------------------------------------------------------------------------------------------------------
# The weights a model samples with, under Hugging Face checkpoint names
# ---------------------------------------------------------------------------------------------------------------
def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight as a float tensor: bitsandbytes 4-bit weights dequantised, others as they are."""
    if weight.__class__.__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return weight.data


def _view_parts(model: nn.Module) -> tuple[nn.Module, tuple[str, ...] | None]:
    """(the Hugging Face causal LM, the adapters switched on) of a plain model or of a view of a shared base."""
    shared = getattr(model, "shared", None)
    if shared is not None and hasattr(model, "names"):
        return shared.lm, tuple(model.names)
    return model, None


@torch.no_grad()
def effective_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight the model computes with, under its checkpoint's names: LoRA adapters that are
    switched on are summed into their layer's weight (W + Σ B·A·scale, in float32), 4-bit weights are dequantised,
    and a tied output embedding appears under its own name too (as in `state_dict`). This is the model an engine
    must reproduce, as a plain checkpoint: the engine needs to know nothing of adapters or quantisation.

    Tensors are the model's own storage where nothing was summed (no copy); `dtype` casts the rest."""
    from salsa.models.qlora import peft

    lm, active = _view_parts(model)
    tuner = peft().tuners.tuners_utils.BaseTunerLayer
    inside: set[int] = set()  # the modules of adapted layers, which are emitted whole

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    for name, module in lm.named_modules():
        if id(module) in inside:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, tuner):
            inside.update(id(m) for m in module.modules())
            base = module.get_base_layer()
            weight = _dequantized(base.weight).float()
            names = active if active is not None else tuple(module.active_adapters)
            for adapter in names:
                if adapter in module.lora_A and not module.disable_adapters:
                    weight = weight + module.get_delta_weight(adapter).float()
            yield f"{prefix}weight", cast(weight)
            if getattr(base, "bias", None) is not None:
                yield f"{prefix}bias", cast(base.bias.data)
            continue
        for pname, p in module.named_parameters(recurse=False):
            yield f"{prefix}{pname}", cast(_dequantized(p) if pname == "weight" else p.data)
        for bname, b in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                yield f"{prefix}{bname}", cast(b)


def engine_config(model: nn.Module) -> dict[str, Any]:
    """The model's architecture as a plain config.json for an engine: quantisation settings dropped, since the
    engine receives dequantised, merged weights (`effective_weights`)."""
    lm, _ = _view_parts(model)
    config = lm.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(lm).__name__]  # a model built from a config has none; the engine needs it
    return config


# ---------------------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------------------
class HFEngine:
    """Sampling with the training model itself (`salsa.models.generation.sample`); `compiled` is the static-cache,
    compiled-decode sampler."""

    name = "hf"
    exact_logprobs = True  # the log-probs come from the training model's own forward

    def __init__(self, compiled: bool = False):
        self.compiled = compiled
        self.model: nn.Module | None = None

    def sync(self, model: nn.Module) -> None:
        self.model = model  # no copy: it samples with the live weights

    def sample(self, tokenizer, query, query_mask, max_new_tokens: int, temperature: float = 1.0,
               do_sample: bool = True) -> Samples:  # fmt: skip
        if self.model is None:
            raise EngineError("sync(model) before sampling")
        return sample(self.model, tokenizer, query, query_mask, max_new_tokens, temperature, do_sample, self.compiled)

    def close(self) -> None:
        self.model = None


class MergedHFEngine(HFEngine):
    """Sampling with a plain copy of the policy (`rollout.engine=hf_merged`): the adapters switched on summed into
    the weights and a 4-bit base dequantised (`effective_weights`), once per rollout, in bfloat16 on CUDA (float32
    elsewhere). Decoding then runs one matmul per projection instead of a 4-bit dequantisation plus two adapter
    products; the update keeps the training model and its precision, and the training model rescores the samples
    (`exact_logprobs` is False), so PPO stays exact. The copy costs the model's parameters × 2 bytes on CUDA."""

    name = "hf_merged"
    exact_logprobs = False

    def __init__(self, model: nn.Module, compiled: bool = False):
        super().__init__(compiled)
        from transformers import AutoConfig, AutoModelForCausalLM

        lm, _ = _view_parts(model)
        device = next(lm.parameters()).device
        self.dtype = compute_dtype(device)
        config = AutoConfig.for_model(**engine_config(model))
        with preserved_rng(device.type == "cuda"), torch.device(device):  # random init: nothing later changes
            self.copy = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval().requires_grad_(False)

    def sync(self, model: nn.Module) -> None:
        weights = dict(effective_weights(model, self.dtype))
        expected = set(self.copy.state_dict())
        if weights.keys() != expected:
            raise EngineError(
                f"the sampling copy does not match the model: missing {sorted(expected - weights.keys())}, "
                f"unexpected {sorted(weights.keys() - expected)}"
            )
        self.copy.load_state_dict(weights)
        self.model = self.copy

    def close(self) -> None:
        super().close()
        self.copy = None


def samples_from_outputs(
    query: torch.Tensor, query_mask: torch.Tensor, tokens: list[list[int]], logprobs: list[list[float]],
    eos_id: int, pad_id: int,
) -> Samples:  # fmt: skip
    """`Samples` from an engine's per-row token ids and their log-probs (each row as generated, ending with the end
    token when it ended): right-padded to the longest row, masked after the first end token, as `sample` returns."""
    width = max(1, max((len(t) for t in tokens), default=0))
    response = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    logp = torch.zeros((len(tokens), width), dtype=torch.float32)
    for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        if len(t) != len(lp):
            raise EngineError(f"row {i}: {len(t)} tokens but {len(lp)} log-probs")
        response[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        logp[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    mask, ended = response_mask(response, eos_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, pad_id))
    device = query.device
    return Samples(query, query_mask, response.to(device), mask.to(device), ended.to(device), (logp * mask).to(device))


def push_weights(llm, weights: Iterator[tuple[str, torch.Tensor]], rebuild_tied_head: bool = True) -> None:
    """Load `weights` (checkpoint names) into a running vLLM engine, in place. The one place that knows each
    backend's quirks:
    - every backend: the worker's `reload_weights`, which runs the model's own loader on the new tensors and
      re-applies what the backend does after loading (the CPU backend repacks linear weights for its kernels);
    - CPU backend: a tied output head (Gemma, SmolLM2) is its own repacked copy of the embedding, which the reload
      does not redo unless `lm_head.weight` is among the tensors: it is rebuilt from the new embedding, else the
      engine would sample with the old head (`rebuild_tied_head=False` only to show that it would)."""
    items = list(weights)

    def reload(worker):
        inner = getattr(worker, "worker", worker)
        inner.reload_weights(weights_iterator=iter(items))
        model = inner.model_runner.model
        head = getattr(model, "lm_head", None)
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        from vllm.platforms import current_platform

        if rebuild_tied_head and tied and head is not None and current_platform.is_cpu():
            method = getattr(head, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(head)
        return True

    llm.collective_rpc(reload)


@contextlib.contextmanager
def preserved_rng(cuda: bool) -> Iterator[None]:
    """Python's, NumPy's and torch's random states as they were before the block: an engine built in the middle of a
    run (a resumed one builds it at another iteration) leaves every later draw as it would have been."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        yield
    random.setstate(py)
    np.random.set_state(npy)


class VLLMEngine:
    """A vLLM engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so pushed weights are passed by reference,
    never pickled. Built from the model's architecture with dummy weights; the first `sync` gives it the real ones,
    in bfloat16 on CUDA and float32 on CPU (`compute_dtype`, as the merged copy of `MergedHFEngine`).
    On CUDA it takes `gpu_memory_utilization` of the device and, with `sleep`, hands its memory back between
    rollouts (vLLM's sleep mode); on CPU its KV cache is `kv_cache_gib` of RAM."""

    name = "vllm"
    exact_logprobs = False  # its kernels round differently: the algorithms rescore with the training model

    def __init__(self, model: nn.Module, settings, max_model_len: int, seed: int = 0):
        if not vllm_available():
            raise EngineError(VLLM_INSTALL)
        self.settings = settings
        device = next(model.parameters()).device
        self.cuda = device.type == "cuda"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # colocated: the engine lives in this process
        if "VLLM_LOGGING_LEVEL" not in os.environ:  # its start-up report, unless asked for
            os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
            logging.getLogger("vllm").setLevel(logging.ERROR)
        if not self.cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the process's threads with torch
        from vllm import LLM

        self.dtype = compute_dtype(device)  # bf16 on CUDA, float32 on CPU, as the merged copy
        self._dir = tempfile.TemporaryDirectory(prefix="salsa-vllm-")
        Path(self._dir.name, "config.json").write_text(json.dumps(engine_config(model), default=str))
        eager = settings.enforce_eager if settings.enforce_eager is not None else not self.cuda
        positions = getattr(_view_parts(model)[0].config, "max_position_embeddings", None)
        max_model_len = min(max_model_len, positions) if positions else max_model_len
        threads = torch.get_num_threads()
        kwargs: dict[str, Any] = {
            "model": self._dir.name, "load_format": "dummy", "dtype": self.dtype, "skip_tokenizer_init": True,
            "seed": seed, "logprobs_mode": "processed_logprobs", "max_model_len": max_model_len,
            "enforce_eager": eager, "gpu_memory_utilization": settings.gpu_memory_utilization,
        }  # fmt: skip
        self.sleeps = self.cuda and settings.sleep
        if self.sleeps:
            kwargs["enable_sleep_mode"] = True
        with preserved_rng(self.cuda):  # vLLM seeds the global generators and draws its dummy weights from them
            self.llm = LLM(**kwargs)
        torch.set_num_threads(threads)  # the CPU backend binds its own; training keeps the process's count
        self.asleep = False
        self.synced: nn.Module | None = None

    def _awake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync(self, model: nn.Module) -> None:
        self._awake()
        push_weights(self.llm, effective_weights(model, self.dtype))
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.synced = model

    def sample(self, tokenizer, query, query_mask, max_new_tokens: int, temperature: float = 1.0,
               do_sample: bool = True) -> Samples:  # fmt: skip
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.synced is None:
            raise EngineError("sync(model) before sampling")
        self._awake()  # evaluation samples several batches after one sync
        prompts = [TokensPrompt(prompt_token_ids=q[m.bool()].tolist()) for q, m in zip(query, query_mask, strict=True)]
        # a function of the caller's torch seed (PPO seeds each iteration), different for every row
        base = int(torch.randint(0, 2**31 - 1, (1,)).item())
        params = [
            SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                temperature=temperature if do_sample else 0.0,
                top_p=1.0,
                top_k=0,
                logprobs=0,
                stop_token_ids=[tokenizer.eos_token_id],
                detokenize=False,
                seed=(base + i) % (2**31 - 1) if do_sample else None,
            )  # fmt: skip
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens, logprobs = [], []
        for out in outputs:
            c = out.outputs[0]
            tokens.append(list(c.token_ids))
            logprobs.append([step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)])
        if self.sleeps:
            self.llm.sleep(level=1)  # weights to host memory, KV cache freed: the update gets the device back
            self.asleep = True
        return samples_from_outputs(query, query_mask, tokens, logprobs, tokenizer.eos_token_id,
                                    tokenizer.pad_token_id)  # fmt: skip

    def close(self) -> None:
        """Shut the engine down now (its memory back before the next stage), not at interpreter exit."""
        llm, self.llm = getattr(self, "llm", None), None
        finalizer = getattr(getattr(llm, "llm_engine", None), "_finalizer", None)
        if finalizer is not None:
            try:
                finalizer()
            except RuntimeError as e:  # the CPU build's teardown asks a CPU-only torch to empty an accelerator cache
                log.debug("vLLM engine shutdown: %s", e)
        del llm
        if getattr(self, "_dir", None) is not None:
            self._dir.cleanup()
            self._dir = None


def make_engine(settings, model: nn.Module, max_model_len: int, compiled: bool = False, seed: int = 0):
    """The engine `settings.engine` names (`rollout=` config), ready for `sync`."""
    if settings.engine == "hf":
        return HFEngine(compiled)
    if settings.engine == "hf_merged":
        return MergedHFEngine(model, compiled)
    if settings.engine == "vllm":
        return VLLMEngine(model, settings, max_model_len, seed)
    raise EngineError(f"unknown rollout engine {settings.engine!r}")
