"""The plugin's configuration: one table of environment variables, parsed and validated here.

Every knob the plugin reads lives in ``ENV_VARS``; ``load()`` parses them all at once and raises
``MetalConfigError`` naming the variable and its valid values. ``register_with_vllm()`` adds them
to vLLM's own table so vLLM does not warn about unknown ``VLLM_*`` variables.
``docs/configuration.md`` is checked against this table by the test suite.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class MetalConfigError(ValueError):
    """A plugin setting is invalid; the message names the variable and the fix."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise MetalConfigError(f"{name}={raw!r} is not a boolean; use 1/0 (or true/false).")


def _vllm_bool(name: str, raw: str) -> bool:
    """vLLM's own reading of its boolean variables (only 1/true are true); anything it would
    silently read as false, other than 0/false/empty, is refused so the two never disagree."""
    value = raw.strip().lower()
    if value in ("1", "true"):
        return True
    if value in ("0", "false", ""):
        return False
    raise MetalConfigError(f"{name}={raw!r} is not a boolean vLLM reads; use True or False.")


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise MetalConfigError(f"{name}={raw!r} is invalid; valid values: {', '.join(choices)}.")
        return value

    return parse


def _fraction(allow_auto: bool) -> Callable[[str, str], float | str]:
    def parse(name: str, raw: str) -> float | str:
        value = raw.strip().lower()
        if allow_auto and value == "auto":
            return "auto"
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not 0.0 < number <= 1.0:
            valid = "'auto' or a number in (0, 1]" if allow_auto else "a number in (0, 1]"
            raise MetalConfigError(f"{name}={raw!r} is invalid; use {valid}.")
        return number

    return parse


def _block_size(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value not in (8, 16, 32, 64, 128):
        raise MetalConfigError(f"{name}={raw!r} is invalid; use one of 8, 16, 32, 64, 128.")
    return value


def _auto_or_count(least: int, unit: str) -> Callable[[str, str], int | str]:
    """``auto``, or a whole number of ``unit`` of at least ``least``."""
    def parse(name: str, raw: str) -> int | str:
        value = raw.strip().lower()
        if value == "auto":
            return "auto"
        try:
            number = int(value)
        except ValueError:
            number = least - 1
        if number < least:
            raise MetalConfigError(f"{name}={raw!r} is invalid; use 'auto' or a whole number of {unit}.")
        return number

    return parse


_mebibytes = _auto_or_count(1, "MiB (1 or more)")
_rows = _auto_or_count(0, "rows (0: never)")
_threads = _auto_or_count(1, "threads (1 or more)")


def _path(name: str, raw: str) -> str | None:
    return os.path.expanduser(raw) if raw else None


def exports_cblas(path: str) -> bool:
    """Whether the shared library at ``path`` loads and provides ``cblas_sgemm`` (MLX's CPU matmul)."""
    import ctypes

    try:
        return hasattr(ctypes.CDLL(path), "cblas_sgemm")
    except OSError:
        return False


def _cpu_blas(name: str, raw: str) -> str:
    """`auto`, `mlx`, or the absolute path of a shared library exporting CBLAS (`cblas_sgemm`)."""
    value = raw.strip()
    if value.lower() in ("auto", "mlx"):
        return value.lower()
    if os.path.isabs(value) and os.path.isfile(value):
        if exports_cblas(value):
            return value
        raise MetalConfigError(f"{name}={raw!r}: that library does not load or does not export "
                               "cblas_sgemm; give an OpenBLAS/MKL/BLIS CBLAS library, or use auto or mlx.")
    raise MetalConfigError(f"{name}={raw!r} is invalid; use auto, mlx, or the absolute path of an "
                           "existing CBLAS shared library (e.g. /usr/lib/x86_64-linux-gnu/libopenblas.so.0).")


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    parse: Callable[[str, str], Any]
    doc: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("VLLM_METAL_MEMORY_FRACTION", "auto", _fraction(allow_auto=True),
           "`auto`, or a fraction in (0, 1] of device memory for weights, activations and the "
           "KV cache together; the KV cache gets what the profiled forward leaves. Numeric values "
           "need the paged path. `auto` = 0.9, or `--gpu-memory-utilization` when that flag is "
           "given (a value other than vLLM's default 0.92); on MLX's CPU backend `auto` also caps "
           "the KV cache at 4 GiB. `--kv-cache-memory-bytes` overrides both."),
    EnvVar("VLLM_METAL_ATTENTION_MB", "auto", _mebibytes,
           "Memory one attention call of the paged path may hold (MiB): the scores of its queries "
           "and the K/V it gathers. Longer prefill chunks and larger decode batches are split into "
           "calls of at most this size, evaluated one after another, so long concurrent prompts "
           "stay within what startup reserved. `auto`: 1/64 of device memory, between 64 MiB and "
           "1 GiB. Smaller values reserve less at startup and launch more calls."),
    EnvVar("VLLM_METAL_ATTENTION_KERNEL", "auto", _choice("auto", "on", "off"),
           "Paged path, steps of several sequences: attention in one GPU kernel per layer that "
           "reads K/V in place through the block tables (`vllm_metal/paged_kernel.py`), instead of "
           "gathering each sequence's blocks into a padded copy for MLX's SDPA. `auto`: the CUDA "
           "kernel where MLX computes on CUDA; MLX ops on Metal and the CPU. `on`: the kernel of "
           "the GPU MLX computes on, the Metal one included (never run on Apple hardware by us); "
           "refused on the CPU. `off`: MLX ops everywhere. A model whose attention the kernel "
           "cannot take (head dims, many query heads per K/V head) uses MLX ops under `auto` and "
           "is refused under `on`."),
    EnvVar("VLLM_METAL_DEQUANTIZE_ROWS", "auto", _rows,
           "Quantized models: a linear layer's product over at least this many rows (the step's "
           "tokens: prefill chunks, large decode batches) dequantizes that layer's weight and runs "
           "a dense matmul instead of MLX's quantized kernel; `0`: never. `auto`: 256 where MLX "
           "computes on CUDA (whose quantized kernels cost 5.5x the bf16 GEMM at 512 rows, "
           "docs/benchmarks.md), never on Metal (MLX's quantized kernels are its most tuned path "
           "there) and on the CPU. The dequantized copy is one layer's weight at a time."),
    EnvVar("VLLM_METAL_QUANTIZED_KERNEL", "off", _choice("auto", "on", "off"),
           "Quantized models, products below `VLLM_METAL_DEQUANTIZE_ROWS` rows: 4-bit affine "
           "layers (group size 64 or 128, bf16/fp16 activations) multiply in a tensor-core CUDA "
           "kernel that reads each weight word once (`vllm_metal/quant_kernel.py`) instead of MLX's "
           "`quantized_matmul`. `off` (the default until the kernel has been run on an NVIDIA GPU; "
           "it has not, see docs/benchmarks.md): MLX's op everywhere. `auto`: the kernel where MLX "
           "computes on CUDA; `on`: the same, refused elsewhere (there is no Metal or CPU "
           "version). Other layers (2/3/5/6/8 bits, group size 32, fp32 activations) always use "
           "MLX's op."),
    EnvVar("VLLM_METAL_USE_MLX", "1", _bool,
           "Use MLX for compute. `0` is refused: MLX is the plugin's only compute path "
           "(use vLLM's own CPU backend with `VLLM_PLUGINS=` instead)."),
    EnvVar("VLLM_MLX_DEVICE", "auto", _choice("auto", "gpu", "cpu"),
           "MLX device: `auto` (the GPU where MLX has one, else the CPU), `gpu` (Metal on Apple "
           "Silicon, CUDA with `mlx[cuda13]`; falls back to the CPU with a warning when MLX has no "
           "GPU) or `cpu`. On the CPU, `--dtype auto` computes in float32 (see Defaults)."),
    EnvVar("VLLM_METAL_CPU_BLAS", "auto", _cpu_blas,
           "BLAS behind MLX's CPU matmuls on Linux. MLX's Linux wheel links netlib's reference "
           "BLAS (one thread, a batch of N rows costs N single rows); `auto` loads an optimized "
           "CBLAS first when that wheel is installed: the system's OpenBLAS, else the one "
           "opencv-python-headless (a vLLM dependency) bundles. `mlx`: keep MLX's own. A path: "
           "that CBLAS library (OpenBLAS, MKL, BLIS). Takes effect only in processes where the "
           "plugin loads before anything imports MLX (every `vllm serve` process)."),
    EnvVar("VLLM_METAL_CPU_BLAS_THREADS", "auto", _threads,
           "MLX's CPU backend with the CBLAS `VLLM_METAL_CPU_BLAS` loaded: threads of its matmuls. "
           "`auto`: every core (this rank's share under tensor parallelism) for a step of fewer "
           "than 8 requests, one core fewer from 8 on, so the API server and the engine keep a "
           "core while many streams are served (on a 2-core machine 16 clients served 2x more "
           "with one BLAS thread than with two, one client 1.4x less; docs/benchmarks.md). A "
           "number: that many threads for every step. `OPENBLAS_NUM_THREADS` only sizes the pool."),
    EnvVar("VLLM_METAL_BLOCK_SIZE", "16", _block_size,
           "Tokens per KV cache block (8, 16, 32, 64 or 128). `--block-size` wins when given."),
    EnvVar("VLLM_METAL_USE_PAGED_ATTENTION", "1", _bool,
           "`1` (default): paged KV cache whose blocks vLLM's block manager hands out, one packed "
           "forward per step. `0`: MLX-managed cache (mlx-lm's per-request caches, one forward per "
           "request; vLLM still accounts blocks for admission); needs "
           "`VLLM_METAL_MEMORY_FRACTION=auto`."),
    EnvVar("VLLM_METAL_DEBUG", "0", _bool,
           "Debug logs: one JSON record per step after `vllm-metal step: ` (`StepRecord` in "
           "`model_runner.py`): batch shape, KV and peak MLX memory, and the step's host time split "
           "where the engine calls the runner (`forward_ms`: execute_model, with its `launch_ms` "
           "(kernels encoded and submitted) and `wait_ms` (for the device: this step, or with one "
           "step ahead the previous one) parts; `between_ms`; "
           "`sample_ms`; `outside_ms`: the engine's own work between steps)."),
    EnvVar("VLLM_METAL_ONE_STEP_AHEAD", "auto", _choice("auto", "1", "0"),
           "`auto`: on where MLX computes on a GPU, off on MLX's CPU backend (there the host and "
           "the computation share the cores, and it measured 5-10% slower). `1`: a step whose requests use only greedy, temperature, top-k, top-p, min-p "
           "or logit bias is sampled in MLX on the device and returned to vLLM one step later, so the "
           "host schedules and records the next step while the device computes this one (needs "
           "vLLM's async scheduling, its default). Other steps (penalties, seeds, "
           "logprobs, structured output...) are sampled by vLLM's Sampler on the host, after the "
           "device is done. `0`: every step is sampled on the host, synchronously."),
    EnvVar("VLLM_METAL_KV_IN_PLACE", "1", _bool,
           "One step ahead: `1` (default) launches a step only once the device has finished the "
           "previous one, so the step's K/V (and recurrent state) writes update the cache in place. "
           "`0` launches at once: MLX copies an array that a running step still reads, so each "
           "step copies every layer's whole K/V pool (for comparison only; docs/benchmarks.md)."),
    EnvVar("VLLM_METAL_DISTRIBUTED_BACKEND", "auto", _choice("auto", "ring", "nccl", "jaccl"),
           "MLX backend joining the ranks of `--tensor-parallel-size N`: `ring` (MLX's TCP ring: "
           "loopback on one machine, Ethernet or Thunderbolt between Macs), `nccl` (NVIDIA GPUs, "
           "`mlx[cuda13]`), `jaccl` (RDMA over Thunderbolt 5; MLX's `MLX_JACCL_COORDINATOR` and "
           "`MLX_IBV_DEVICES` must be set). `auto`: `nccl` where MLX computes on CUDA, else `ring`."),
    EnvVar("VLLM_METAL_HOSTFILE", "", _path,
           "Ring backend across machines: an MLX ring hostfile, a JSON list with one list of "
           "`\"ip:port\"` addresses per rank, in vLLM's rank order (`scripts/two_macs.sh` writes "
           "one). Unset: every rank on this machine, at free loopback ports."),
    EnvVar("VLLM_USE_MODELSCOPE", "False", _vllm_bool,
           "`True`: model ids are ModelScope ids, resolved offline to the local ModelScope cache "
           "(`$MODELSCOPE_CACHE` or `~/.cache/modelscope/hub`); vLLM then needs `pip install modelscope`."),
    EnvVar("VLLM_METAL_MODELSCOPE_CACHE", "", _path,
           "Absolute path of a local ModelScope model directory, or of a ModelScope cache root to "
           "search first."),
    EnvVar("VLLM_METAL_PREFIX_CACHE", "", _bool,
           "`1` turns prefix caching on, `0` off; when set it overrides vLLM's "
           "`--enable-prefix-caching` / `--no-enable-prefix-caching`. Unset: vLLM decides."),
    EnvVar("VLLM_METAL_PREFIX_CACHE_FRACTION", "0.05", _fraction(allow_auto=False),
           "MLX-managed path: fraction in (0, 1] of device memory that prompt-prefix K/V "
           "snapshots may take (LRU). The paged path keeps prefixes in vLLM's block pool (free "
           "blocks double as the prefix cache), where this bound does not apply."),
)


@dataclass(frozen=True)
class MetalEnvs:
    memory_fraction: float | str
    attention_mb: int | str
    attention_kernel: str  # auto, on or off
    dequantize_rows: int | str  # auto or rows (0: never)
    quantized_kernel: str  # auto, on or off
    use_mlx: bool
    mlx_device: str
    cpu_blas: str
    cpu_blas_threads: int | str  # auto or threads
    block_size: int
    use_paged_attention: bool
    debug: bool
    one_step_ahead: str  # auto, 1 or 0
    kv_in_place: bool
    distributed_backend: str  # auto, ring, nccl or jaccl
    hostfile: str | None
    use_modelscope: bool
    modelscope_cache: str | None
    prefix_cache: bool
    prefix_cache_fraction: float
    prefix_cache_set: bool


def load(environ: dict[str, str] | None = None) -> MetalEnvs:
    """Parse every variable and check the combinations; raise MetalConfigError on a bad one."""
    env = os.environ if environ is None else environ
    raw = {var.name: env.get(var.name, var.default) for var in ENV_VARS}
    parsed = {var.name: var.parse(var.name, raw[var.name]) for var in ENV_VARS}
    cfg = MetalEnvs(
        memory_fraction=parsed["VLLM_METAL_MEMORY_FRACTION"],
        attention_mb=parsed["VLLM_METAL_ATTENTION_MB"],
        attention_kernel=parsed["VLLM_METAL_ATTENTION_KERNEL"],
        dequantize_rows=parsed["VLLM_METAL_DEQUANTIZE_ROWS"],
        quantized_kernel=parsed["VLLM_METAL_QUANTIZED_KERNEL"],
        use_mlx=parsed["VLLM_METAL_USE_MLX"],
        mlx_device=parsed["VLLM_MLX_DEVICE"],
        cpu_blas=parsed["VLLM_METAL_CPU_BLAS"],
        cpu_blas_threads=parsed["VLLM_METAL_CPU_BLAS_THREADS"],
        block_size=parsed["VLLM_METAL_BLOCK_SIZE"],
        use_paged_attention=parsed["VLLM_METAL_USE_PAGED_ATTENTION"],
        debug=parsed["VLLM_METAL_DEBUG"],
        one_step_ahead=parsed["VLLM_METAL_ONE_STEP_AHEAD"],
        kv_in_place=parsed["VLLM_METAL_KV_IN_PLACE"],
        distributed_backend=parsed["VLLM_METAL_DISTRIBUTED_BACKEND"],
        hostfile=parsed["VLLM_METAL_HOSTFILE"],
        use_modelscope=parsed["VLLM_USE_MODELSCOPE"],
        modelscope_cache=parsed["VLLM_METAL_MODELSCOPE_CACHE"],
        prefix_cache=parsed["VLLM_METAL_PREFIX_CACHE"],
        prefix_cache_fraction=parsed["VLLM_METAL_PREFIX_CACHE_FRACTION"],
        prefix_cache_set=bool(env.get("VLLM_METAL_PREFIX_CACHE")),
    )
    if not cfg.use_mlx:
        raise MetalConfigError(
            "VLLM_METAL_USE_MLX=0: MLX is vllm-metal's only compute path. Unset it, or run "
            "vLLM's built-in CPU backend instead with VLLM_PLUGINS= (empty) or "
            "VLLM_TARGET_DEVICE=cpu."
        )
    if not cfg.use_paged_attention and cfg.memory_fraction != "auto":
        raise MetalConfigError(
            f"VLLM_METAL_MEMORY_FRACTION={cfg.memory_fraction} needs the paged KV path: set "
            "VLLM_METAL_USE_PAGED_ATTENTION=1, or VLLM_METAL_MEMORY_FRACTION=auto."
        )
    return cfg


# Variables of the project's other files, which the server does not configure itself with but a
# user's shell may export: where model files are cached (GGUF views, the bundled model), install.sh's
# settings (`install.sh --help`), and the test suite's outputs.
OTHER_VARS: dict[str, str] = {
    "VLLM_METAL_MODEL_CACHE": "Cache root for GGUF views and the bundled model's checkpoints "
                              "(default `~/.cache/vllm-metal/models`).",
    **{name: "install.sh (`bash install.sh --help`)." for name in (
        "VLLM_METAL_VENV", "VLLM_METAL_PYTHON", "VLLM_METAL_SOURCE", "VLLM_METAL_CUDA",
        "VLLM_METAL_VLLM_WHEEL", "VLLM_METAL_TORCH_INDEX", "VLLM_METAL_SKIP_SMOKE")},
    "VLLM_METAL_TEST_LOGS": "Test suite: where server logs go (default `/tmp/vllm-metal-test-logs`).",
    "VLLM_METAL_MATRIX_OUT": "Test suite: where the model matrix's results go (tests/test_models.py).",
}


def register_with_vllm() -> None:
    """Add the plugin's variables (and ``OTHER_VARS``) to vLLM's table so vLLM does not warn they
    are unknown."""
    import vllm.envs as vllm_envs

    for var in ENV_VARS:
        if var.name not in vllm_envs.environment_variables:
            vllm_envs.environment_variables[var.name] = (
                lambda v=var: v.parse(v.name, os.environ.get(v.name, v.default))
            )
    for name in OTHER_VARS:
        vllm_envs.environment_variables.setdefault(name, lambda n=name: os.environ.get(n))


def configuration_markdown() -> str:
    """The Markdown table of ``ENV_VARS`` (name, default, description) for docs/configuration.md."""
    lines = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for var in ENV_VARS:
        default = f"`{var.default}`" if var.default else "(unset)"
        doc = var.doc.replace("|", "\\|")
        lines.append(f"| `{var.name}` | {default} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(configuration_markdown(), end="")
