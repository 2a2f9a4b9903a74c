"""A GGUF file as a checkpoint directory vLLM can read: ``vllm serve model.gguf``.

vLLM 0.32 has no GGUF support left: it reads ``config.json`` (and the tokenizer) from the model
path. For a ``.gguf`` file we build, once per file, a small "view" directory in the model cache
holding the config transformers derives from the GGUF metadata, a generation config, the
tokenizer rebuilt from the file (when transformers can) and a pointer back to the file. The
weights are never copied: the loader reads them from the GGUF itself.

Files the plugin cannot load (architecture, tensor types) are refused here, in the API server
process, before any engine starts. ``patches.vllm.resolve_model_names`` hands vLLM the view
instead of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from vllm_metal.gguf.names import ARCHITECTURES, HF_ARCHITECTURES

if TYPE_CHECKING:  # the reader needs the `gguf` package, imported only when a file is served
    from vllm_metal.gguf.reader import GgufFile

logger = init_logger("vllm.metal")

POINTER = "vllm_metal_gguf.json"
VIEW_FORMAT = 1
# The dtype "auto" resolves to: GGUF block scales are float16, so float16 keeps Q4_0/Q4_1/Q5_x/
# Q8_0 weights exact (float32 also does, and is what K-quant scales need to stay exact).
VIEW_DTYPE = "float16"


class GgufError(ValueError):
    """A GGUF file vllm-metal cannot serve; the message says why and what to do."""


def is_gguf_file(model: Any) -> bool:
    return isinstance(model, (str, Path)) and str(model).endswith(".gguf") and Path(model).is_file()


def is_view(model_dir: Path) -> bool:
    return (Path(model_dir) / POINTER).is_file()


def read_pointer(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / POINTER).read_text())


def _cache_root() -> Path:
    from vllm_metal.paths import model_cache_dir

    return model_cache_dir() / "gguf"


def view_dir(gguf: Path) -> Path:
    """Where the view of ``gguf`` lives; a changed file (size, mtime) gets a new one."""
    import transformers

    gguf = gguf.resolve()
    st = gguf.stat()
    key = f"{VIEW_FORMAT}|{gguf}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return _cache_root() / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def check_loadable(reader: GgufFile) -> dict[str, int]:
    """Refuse an architecture or tensor type we cannot load exactly; return the type counts."""
    from gguf import GGMLQuantizationType

    from vllm_metal.gguf.blocks import why_unsupported

    path = reader.path
    arch = reader.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GgufError(
            f"{path.name}: GGUF architecture {arch!r} is not supported by vllm-metal's GGUF loader "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}; Mistral files use 'llama'). "
            "Serve the original Hugging Face or MLX checkpoint instead."
        )
    if int(reader.metadata.get("split.count", 1)) > 1:
        raise GgufError(
            f"{path.name} is one shard of a split GGUF; merge the shards first "
            "(llama-gguf-split --merge FIRST_SHARD.gguf OUT.gguf) and serve the merged file."
        )
    refused: dict[str, list[str]] = {}
    for t in reader.tensors:
        if why_unsupported(t.qtype) is not None:
            refused.setdefault(t.qtype.name, []).append(t.name)
    if refused:
        lines = []
        for type_name, names in sorted(refused.items()):
            reason = why_unsupported(GGMLQuantizationType[type_name])
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"{len(names)} tensor(s) of type {type_name} ({shown}): {reason}")
        raise GgufError(
            f"{path.name} cannot be loaded without dequantizing: " + "; ".join(lines) + ". "
            "vllm-metal keeps GGUF weights quantized and loads F32, F16, BF16, Q4_0, Q4_1, Q5_0, "
            "Q5_1, Q8_0, Q4_K and Q5_K tensors exactly. Use a file quantized to those types "
            "(e.g. llama-quantize --pure ... Q4_K or Q8_0), or an MLX checkpoint (mlx_lm.convert)."
        )
    return dict(Counter(t.qtype.name for t in reader.tensors))


def _hf_config(gguf: Path, reader: GgufFile, arch: str) -> dict:
    """transformers' config from the GGUF metadata, with what it leaves out filled in."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
    config.pop("_model_name_or_path", None)
    config["architectures"] = [HF_ARCHITECTURES[config.get("model_type", arch)]]
    config["dtype"] = VIEW_DTYPE
    key_length = reader.metadata.get(f"{arch}.attention.key_length")
    if key_length:  # qwen3's head_dim is not hidden_size / heads; transformers' map omits it
        config["head_dim"] = int(key_length)
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config["vocab_size"] = embed.dims[1]  # the table's rows are the truth
    config["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    params = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in params:
        config["rope_theta"] = params["rope_theta"]  # readers of the raw config look here
    return config


def _write_tokenizer(gguf: Path, out: Path, context_length: int | None) -> str | None:
    """Rebuild the tokenizer from the GGUF; None when written, else why it could not be."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001 - any failure just means "pass --tokenizer"
        return f"{type(exc).__name__}: {exc}"
    if context_length:
        tok.model_max_length = int(context_length)
    tok.save_pretrained(str(out), save_jinja_files=False)
    return None


def _build(gguf: Path, out: Path) -> None:
    try:
        from vllm_metal.gguf.reader import GgufFile
    except ImportError as exc:
        raise GgufError(f"Serving {gguf.name} needs the `gguf` package: pip install gguf") from exc
    reader = GgufFile(gguf)
    types = check_loadable(reader)
    arch = reader.metadata["general.architecture"]
    out.mkdir(parents=True)
    config = _hf_config(gguf, reader, arch)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {k: reader.metadata.get(f"tokenizer.ggml.{g}") for k, g in
           (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id"))}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}) + "\n")
    tokenizer_error = _write_tokenizer(gguf, out, reader.metadata.get(f"{arch}.context_length"))
    st = gguf.stat()
    pointer = {"format": VIEW_FORMAT, "gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
               "architecture": arch, "tensor_types": types, "tokenizer_error": tokenizer_error}
    (out / POINTER).write_text(json.dumps(pointer, indent=2) + "\n")


def ensure_view(gguf: Path | str) -> Path:
    """The view directory of ``gguf``, built on first use (atomically: temp dir + rename)."""
    gguf = Path(gguf).expanduser().resolve()
    dest = view_dir(gguf)
    if is_view(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        _build(gguf, staging / "view")
        try:
            os.rename(staging / "view", dest)
        except OSError:
            if not is_view(dest):  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("vllm-metal: GGUF %s -> config/tokenizer view %s", gguf, dest)
    return dest


def check_tokenizer(model: Path | str, tokenizer: str | None) -> None:
    """Build ``model``'s view; refuse to go on without ``tokenizer`` when the view has none."""
    error = read_pointer(ensure_view(model)).get("tokenizer_error")
    if not tokenizer and error:
        raise GgufError(
            f"{Path(model).name}: transformers cannot rebuild the tokenizer from this GGUF ({error}). "
            "Pass the original model's tokenizer: --tokenizer <Hugging Face model dir or id>."
        )
