"""Checks on a local checkpoint before the engine starts, in the API server process.

A truncated or corrupt weights file, a missing shard, a missing tokenizer or an architecture
mlx-lm lacks would otherwise fail only after the engine process has started, with a stack trace
from deep inside MLX or transformers (whose message for a missing tokenizer asks to install
sentencepiece). Here each fails in seconds with the file and the fix named. Only headers and
config.json are read, never tensor data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

# A directory holding any of these has a tokenizer vocabulary transformers/vLLM can load.
TOKENIZER_GLOBS = ("tokenizer.json", "tokenizer.model*", "*.tiktoken", "vocab.json", "vocab.txt",
                   "tekken.json", "spiece.model", "*sentencepiece*.model", "*.vocab")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


class CheckpointError(ValueError):
    """The checkpoint on disk cannot be served; the message names the file and the fix."""


def check_checkpoint(model_config: Any, tensor_parallel_size: int = 1) -> None:
    """Check ``model_config``'s local checkpoint directory and tokenizer; no-op for other sources."""
    if model_config is None:
        return
    model_dir = Path(str(model_config.model)).expanduser()
    if model_dir.is_dir():
        config = model_dir / "config.json"
        if config.is_file():
            from vllm_metal import mlx_lm_models

            mlx_lm_models.check_runnable(json.loads(config.read_text()), tensor_parallel_size)
        check_weights(model_dir)
    tokenizer = Path(str(model_config.tokenizer or model_config.model)).expanduser()
    if not getattr(model_config, "skip_tokenizer_init", False) and tokenizer.is_dir():
        check_tokenizer(tokenizer)


def check_weights(model_dir: Path) -> None:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise CheckpointError(
                f"vllm-metal: checkpoint {model_dir} is incomplete: {index.name} names "
                f"{', '.join(missing)}, which are missing. Download the missing shards (or the "
                "whole checkpoint) again."
            )
    for path in sorted(model_dir.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            raise CheckpointError(
                f"vllm-metal: weights file {path} is corrupt or incomplete: {problem}. Download "
                "or convert the checkpoint again (an interrupted download leaves a truncated file)."
            )


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with the safetensors file's framing (header and data extent), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"the file has {size} bytes, fewer than a safetensors header needs"
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, MAX_HEADER_BYTES):
            return f"its header claims {length} bytes but the file has {size}"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError) as exc:
            return f"its header is not valid JSON ({exc})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            return f"tensor {name!r} has no valid data_offsets"
    if 8 + length + end > size:
        return f"its tensors need {8 + length + end} bytes but the file has only {size}"
    return None


def check_tokenizer(tokenizer_dir: Path) -> None:
    if any(next(tokenizer_dir.glob(pattern), None) for pattern in TOKENIZER_GLOBS):
        return
    raise CheckpointError(
        f"vllm-metal: no tokenizer in {tokenizer_dir} (none of {', '.join(TOKENIZER_GLOBS)}). "
        "Copy the tokenizer files from the original checkpoint into it, pass --tokenizer PATH, "
        "or pass --skip-tokenizer-init and send token ids."
    )
