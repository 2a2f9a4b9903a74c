"""Which MLX device runs the model, and how much memory it has.

``VLLM_MLX_DEVICE=auto`` (the default) is the GPU where MLX has one (Metal on Apple Silicon, CUDA
where ``mlx[cuda13]`` is installed), else MLX's CPU backend; an explicit ``gpu`` without one falls
back to the CPU with a warning.
"""

from __future__ import annotations

import functools
import os
import time

import mlx.core as mx
import psutil
from vllm.logger import init_logger

logger = init_logger("vllm.metal")


def gpu_backend() -> str | None:
    """'metal', 'cuda' or None: the accelerator MLX can use in this process."""
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


# MLX ends a GPU command buffer (a CUDA graph on NVIDIA) once the arrays its kernels read add up
# to MLX_MAX_MB_PER_BUFFER megabytes (1000 on an H100/H200). Each K/V write reads its layer's whole
# pool (it updates it in place), so with that default a pool of a few GB cuts every decode step
# into extra buffers, each one more launch; we lift the byte bound and let the kernel count
# (MLX_MAX_OPS_PER_BUFFER) bound each buffer.
# MLX's CUDA backend caches the CUDA graphs it builds (MLX_CUDA_GRAPH_CACHE_SIZE, 400, least recently
# used out) and by default raises "Cache thrashing is happening" on every miss once a process has
# missed 800 times in its life (MLX_ENABLE_CACHE_THRASHING_CHECK): a server's steps keep changing
# composition, so that could end a long-running engine, not just slow it. MLX's tests turn it off.
# MLX 0.32.4 reads all of these when a GPU stream's encoder is made. A value the user sets is kept.
MLX_ENV_DEFAULTS = {"MLX_MAX_MB_PER_BUFFER": str(1 << 20), "MLX_ENABLE_CACHE_THRASHING_CHECK": "0"}


def configure_mlx() -> None:
    """Set MLX's encoder variables we depend on, unless the user set them. MLX reads them once,
    when a stream first encodes GPU work, so this runs before any array is evaluated."""
    for name, value in MLX_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def resolve_device(requested: str) -> str:
    """The device VLLM_MLX_DEVICE's ``requested`` ('auto', 'gpu' or 'cpu') runs on: 'gpu' where
    MLX has one and the CPU was not asked for, else 'cpu'."""
    return "gpu" if requested != "cpu" and gpu_backend() is not None else "cpu"


def requested_device() -> str:
    """VLLM_MLX_DEVICE from the environment, or ``auto`` while it is invalid (the platform refuses
    it at startup with the valid values)."""
    from vllm_metal import envs

    try:
        return envs.load().mlx_device
    except envs.MetalConfigError:
        return "auto"


def configured_device() -> str:
    """'gpu' or 'cpu': where VLLM_MLX_DEVICE, as set in the environment, runs the model."""
    return resolve_device(requested_device())


def select_device(requested: str) -> mx.Device:
    """Make ``requested`` (VLLM_MLX_DEVICE) MLX's default device; an explicit ``gpu`` on a machine
    without one falls back to the CPU with a warning."""
    configure_mlx()
    return _select_device(requested)


@functools.cache
def _select_device(requested: str) -> mx.Device:
    device = resolve_device(requested)
    if requested == "gpu" and device == "cpu":
        logger.warning(
            "VLLM_MLX_DEVICE=gpu but MLX has no Metal or CUDA device here; running on MLX's CPU "
            "backend (slow). On Linux+NVIDIA install mlx[cuda13]; unset VLLM_MLX_DEVICE (auto) or "
            "set it to cpu to silence this warning."
        )
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    return mx.default_device()


def on_gpu() -> bool:
    """Whether MLX's default device (set by ``select_device``) is an accelerator."""
    return mx.default_device().type == mx.DeviceType.gpu


def describe_device() -> str:
    return f"gpu ({gpu_backend()})" if on_gpu() else "cpu"


def device_memory_bytes() -> int:
    """Memory MLX may use: Metal's recommended working set, the CUDA card's, or system RAM."""
    if on_gpu():
        info = mx.device_info()
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            if info.get(key):
                return int(info[key])
    return int(psutil.virtual_memory().total)


class EvalTimer:
    """Evaluates a step's arrays: ``mx.eval``, or with ``wait`` off only ``mx.async_eval`` (the
    runner's one-step-ahead mode: whoever reads the arrays waits). With ``wait`` off and
    ``in_place`` on (VLLM_METAL_KV_IN_PLACE), it first waits for the device to finish what it was
    given before, the previous step: MLX writes into an array in place only when nothing else holds
    its buffer, and a step still running holds every array it reads, so launching the next step's
    K/V writes while the previous step runs would copy each layer's whole pool. The host still
    builds the step's graph while the device works; what waiting gives up is encoding it then.
    When ``split`` is on (VLLM_METAL_DEBUG), timed in two parts: ``launch_s`` (``mx.async_eval``:
    the host encodes and submits the kernels) and ``wait_s`` (for the device: until this step is
    done, or with ``wait`` off until the previous one is). A single stream on a fast GPU is
    host-bound, and this says by how much."""

    def __init__(self, split: bool = False, wait: bool = True, in_place: bool = True):
        self.split = split
        self.wait = wait
        self.in_place = in_place
        self.launch_s = 0.0
        self.wait_s = 0.0

    def __call__(self, *arrays) -> None:
        t0 = time.perf_counter()
        if not self.wait and self.in_place:
            mx.synchronize()
        if not self.split:
            (mx.eval if self.wait else mx.async_eval)(*arrays)
            return
        t1 = time.perf_counter()
        mx.async_eval(*arrays)
        t2 = time.perf_counter()
        if self.wait:
            mx.eval(*arrays)
        self.launch_s, self.wait_s = t2 - t1, (time.perf_counter() - t2) if self.wait else t1 - t0
