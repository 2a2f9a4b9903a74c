"""MetalPlatform: tells vLLM that the model runs in MLX, and rewrites the config to fit.

vLLM keeps its engine, scheduler and server; torch stays on the CPU (``device_type="cpu"``) and
only carries small tensors at the boundaries (sampling). All config checks and rewrites live in
``check_and_update_config`` so a refused configuration is refused before any weights load.
"""

from __future__ import annotations

import os
import random
import sys
from typing import TYPE_CHECKING

import psutil
import torch
from vllm.logger import init_logger
from vllm.platforms.interface import Platform, PlatformEnum

from vllm_metal import distributed, envs, patches, preflight
from vllm_metal.device import (
    configured_device,
    describe_device,
    device_memory_bytes,
    requested_device,
    select_device,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger("vllm.metal")

WORKER_CLS = "vllm_metal.worker.MetalWorker"


class MetalPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name = "cpu"  # torch-side device: MLX owns the accelerator
    device_type = "cpu"
    dispatch_key = "CPU"
    dist_backend = "gloo"
    simple_compile_backend = "eager"
    supported_quantization: list[str] = []

    @classmethod
    def log_warnings(cls) -> None:
        logger.info("vllm-metal: MLX platform active on %s (VLLM_MLX_DEVICE=%s, pid %d)",
                    describe_device(), requested_device(), os.getpid())

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        """What ``--dtype auto`` may pick, preferred first (vLLM keeps an explicit ``--dtype``).

        MLX's CPU backend has no fast half-precision kernels (bf16/fp16 matmuls run several
        times slower than fp32, quantized ones 10-50x), so there ``auto`` means float32 for
        every checkpoint; on a GPU a half-precision checkpoint keeps its dtype and a float32
        one is downcast to bfloat16, as vLLM does on CUDA.
        """
        if configured_device() == "cpu":
            return [torch.float32]
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        return f"MLX {describe_device()}"

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return device_memory_bytes()

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        """No-op: MLX picks its device itself; vLLM's executor only needs the call to succeed."""

    @classmethod
    def import_kernels(cls) -> None:
        """vLLM's CPU ops, in the build this CPU can execute (see ``patches.vllm.import_cpu_kernels``)."""
        patches.vllm.import_cpu_kernels()

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        import mlx.core as mx

        mx.random.seed(seed)
        random.seed(seed)
        torch.manual_seed(seed)

    @classmethod
    def inference_mode(cls):
        return torch.inference_mode(mode=True)

    @classmethod
    def get_current_memory_usage(cls, device: torch.device | None = None) -> float:
        return float(psutil.Process().memory_info().rss)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        # Attention never runs through vLLM's torch backends; this name only satisfies
        # code paths that resolve one (e.g. KV cache layout negotiation).
        return "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"

    @classmethod
    def is_sleep_mode_available(cls) -> bool:
        return False

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        return True  # several KV cache groups: sliding-window layers hold only their window

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        # vLLM's process groups carry only its control plane (gloo); the model's collectives are
        # MLX's (vllm_metal.distributed). Its CPU communicator would also set up shared memory
        # for all-reduces nothing here makes.
        return "vllm.distributed.device_communicators.base_device_communicator.DeviceCommunicatorBase"

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        """Before vLLM builds its config: resolve ModelScope ids to the local cache, let a
        ``.gguf`` file stand for a checkpoint directory, and default the API server's
        ``--tool-strict-level`` to ``parameter``.

        Under vLLM's ``auto``, a forced tool call (``tool_choice`` "required", a named function,
        Anthropic ``any``/``tool``) holds only the call's envelope to a grammar unless the tool is
        declared ``strict``; the small models this platform serves then return arguments that
        are not the tool's schema (``"Paris"`` for ``{"city": string}``), which the Anthropic
        route answers with a 400 blaming the client. ``parameter`` holds every forced call's
        arguments to the schema; an explicit ``--tool-strict-level`` is kept.
        """
        cfg = _load_envs()
        patches.model_names(cfg.use_modelscope, cfg.modelscope_cache)
        if parser is not None and parser.get_default("tool_strict_level") is not None:
            parser.set_defaults(tool_strict_level="parameter")

    @classmethod
    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        """Validate our env vars and the vLLM flags we cannot honour; set worker and cache."""
        cfg = _load_envs()
        select_device(cfg.mlx_device)  # logs the fallback once, early
        patches.in_platform()  # torch.accelerator no-ops; the API server's key and field checks
        parallel = vllm_config.parallel_config
        # corrupt weights, no tokenizer, a model that does not split --tensor-parallel-size ways
        preflight.check_checkpoint(vllm_config.model_config, parallel.tensor_parallel_size)

        refuse = []
        if parallel.tensor_parallel_size > 1:
            refuse += distributed.refusals(vllm_config, cfg)
        if parallel.pipeline_parallel_size > 1:
            refuse.append("--pipeline-parallel-size must be 1: every rank holds a share of each layer "
                          "(--tensor-parallel-size), not a range of layers")
        if parallel.data_parallel_size > 1:
            refuse.append("--data-parallel-size must be 1")
        spec = vllm_config.speculative_config
        if spec is not None and spec.method not in ("ngram", "draft_model"):
            refuse.append(f"speculative decoding by {spec.method!r} (--speculative-config) is not supported; "
                          "only n-gram drafts (\"method\": \"ngram\") and a draft model (\"method\": "
                          "\"draft_model\", \"model\": PATH)")
        elif spec is not None and not cfg.use_paged_attention:
            refuse.append("speculative decoding (--speculative-config) needs the paged KV cache "
                          "(VLLM_METAL_USE_PAGED_ATTENTION=1)")
        if cfg.attention_kernel == "on" and (configured_device() == "cpu" or not cfg.use_paged_attention):
            refuse.append("VLLM_METAL_ATTENTION_KERNEL=on needs MLX on a GPU (CUDA or Metal) and the paged KV "
                          "cache; use auto or off here")
        if vllm_config.lora_config is not None and not cfg.use_paged_attention:
            refuse.append("LoRA (--enable-lora) needs the paged KV cache (VLLM_METAL_USE_PAGED_ATTENTION=1)")
        model_config = vllm_config.model_config
        if model_config is not None and model_config.runner_type == "pooling":
            if model_config.convert_type != "embed":
                refuse.append(f"--runner pooling serves embeddings only (--convert embed, the default for a "
                              f"*ForCausalLM checkpoint), not --convert {model_config.convert_type}")
        elif model_config is not None and model_config.runner_type != "generate":
            refuse.append(f"--runner {model_config.runner_type} is not supported; only generation and "
                          "embeddings (--runner pooling)")
        if model_config is not None and model_config.enable_prompt_embeds:
            refuse.append("--enable-prompt-embeds is not supported (the MLX model takes token ids)")
        if vllm_config.kv_transfer_config is not None:
            refuse.append("--kv-transfer-config is not supported")
        cache = vllm_config.cache_config
        if cache.cache_dtype not in ("auto", None):
            refuse.append(f"--kv-cache-dtype {cache.cache_dtype} is not supported; use auto")
        v2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip()
        if v2 not in ("", "0"):
            refuse.append(f"VLLM_USE_V2_MODEL_RUNNER={v2} is not supported (vllm-metal's runner speaks "
                          "the V1 model-runner protocol); unset it or set it to 0")
        if refuse:
            _report_refusals_plainly()
            raise UnsupportedConfiguration("vllm-metal cannot run this configuration: " + "; ".join(refuse) + ".")

        # vLLM picks its V2 runner by itself where Triton imports (Linux with CUDA torch); its
        # scheduler then resumes a preempted request as a new one whose history rides in
        # ``prefill_token_ids``, which a V1 runner would read as a bare prompt. Child processes
        # inherit this.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        _float32_means_float32(model_config)
        _say_cpu_dtype(model_config)
        if parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER_CLS
        if parallel.distributed_executor_backend is None:
            parallel.distributed_executor_backend = "uni"
        if parallel.world_size > 1:
            _plan_ranks(vllm_config, cfg)

        sched = vllm_config.scheduler_config
        if spec is not None and sched.async_scheduling:  # drafts are proposed after each step's tokens
            logger.info("vllm-metal: speculative decoding runs with synchronous scheduling")
            sched.async_scheduling = False
        if sched.scheduler_cls is None:  # vLLM's, plus finishing a failed step's requests (scheduler.py)
            sched.scheduler_cls = ("vllm_metal.scheduler.MetalAsyncScheduler" if sched.async_scheduling
                                   else "vllm_metal.scheduler.MetalScheduler")

        if not cache.user_specified_block_size:
            cache.block_size = cfg.block_size
        if cfg.prefix_cache_set:
            cache.enable_prefix_caching = cfg.prefix_cache
        if cache.enable_prefix_caching and _is_hybrid(model_config):
            logger.info("vllm-metal: prefix caching is off for %s: its recurrent-state layers keep one "
                        "state per request, not one per cached block, so a cached prefix could not be "
                        "resumed", model_config.architecture)
            cache.enable_prefix_caching = False
            cache.mamba_cache_mode = "none"  # what vLLM sets for hybrid models without prefix caching
            cache.mamba_block_size = model_config.max_model_len

        # No torch.compile / CUDA graphs: the forward is MLX.
        from vllm.config import CompilationMode, CUDAGraphMode

        comp = vllm_config.compilation_config
        comp.mode = CompilationMode.NONE
        comp.cudagraph_capture_sizes = []
        comp.cudagraph_mode = CUDAGraphMode.NONE
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def _plan_ranks(vllm_config: VllmConfig, cfg: envs.MetalEnvs) -> None:
    """Plan the ranks' MLX group (``distributed.plan``) and hand it to the workers in the config."""
    backend = distributed.resolve_backend(cfg.distributed_backend)
    try:
        plan = distributed.plan(vllm_config.parallel_config.world_size, backend, cfg.hostfile)
        if not isinstance(vllm_config.additional_config, dict):
            raise UnsupportedConfiguration("vllm-metal cannot run this configuration: --additional-config "
                                           "must be a JSON object with --tensor-parallel-size > 1.")
    except _REFUSALS:
        _report_refusals_plainly()
        raise
    vllm_config.additional_config[distributed.CONFIG_KEY] = plan.to_config()
    logger.info("vllm-metal: %d ranks over MLX's %s backend", plan.world_size, plan.backend)


def _is_hybrid(model_config) -> bool:
    """vLLM's registry says the architecture mixes attention with recurrent-state layers."""
    try:
        return model_config is not None and bool(model_config.is_hybrid)
    except Exception:  # noqa: BLE001 - an architecture vLLM cannot inspect is not known to be hybrid
        return False


class UnsupportedConfiguration(ValueError):
    """vLLM flags or settings this platform cannot honour; the message names each one."""


_REFUSALS = (UnsupportedConfiguration, envs.MetalConfigError, distributed.DistributedError)


def _load_envs() -> envs.MetalEnvs:
    """``envs.load()``; an invalid variable that nothing catches ends ``vllm serve`` with one line."""
    try:
        return envs.load()
    except envs.MetalConfigError:
        _report_refusals_plainly()
        raise


def _report_refusals_plainly() -> None:
    """Where nothing catches a refusal (the ``vllm serve`` command line), print its message as
    the last line instead of the ~50-line traceback pydantic wraps it in (exit status 1, as for
    any uncaught exception). Code that catches the exception sees it unchanged."""
    previous = sys.excepthook

    def excepthook(kind, exc, tb):
        reason = _refusal(exc)
        if reason is None:
            previous(kind, exc, tb)
        else:
            print(f"ERROR: {reason}", file=sys.stderr)

    if not getattr(previous, "vllm_metal_refusals", False):
        excepthook.vllm_metal_refusals = True
        sys.excepthook = excepthook


def _refusal(exc: BaseException) -> str | None:
    """The platform's refusal message in ``exc``, also where pydantic wrapped it (VllmConfig)."""
    if isinstance(exc, _REFUSALS):
        return str(exc)
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            for error in errors():
                inner = error.get("ctx", {}).get("error")
                if isinstance(inner, _REFUSALS):
                    return str(inner)
        except Exception:  # noqa: BLE001 - not pydantic's ValidationError after all
            return None
    return None


def _float32_means_float32(model_config) -> None:
    """``--dtype float32`` computes in float32, as vLLM's does on CUDA (torch keeps TF32 off).

    MLX runs float32 matmuls as TF32 on hardware that has it (NVIDIA GPUs, M5-class Apple GPUs)
    unless ``MLX_ENABLE_TF32=0``; batched (GEMM) and single-row (GEMV) products then round
    differently and greedy tokens change with the batch. A value the user set is kept. The
    engine process inherits the variable; MLX reads it at its first matmul there.
    """
    if model_config is None or model_config.dtype != torch.float32 or "MLX_ENABLE_TF32" in os.environ:
        return
    os.environ["MLX_ENABLE_TF32"] = "0"
    logger.info("vllm-metal: float32 matmuls stay exact (MLX_ENABLE_TF32=0); "
                "set MLX_ENABLE_TF32=1 to allow TF32 where the GPU has it")


def _say_cpu_dtype(model_config) -> None:
    """Say once, where MLX computes on the CPU, that a half-precision checkpoint runs in float32
    (``supported_dtypes``: what ``--dtype auto`` picks there)."""
    if model_config is None or configured_device() != "cpu":
        return
    stored = getattr(model_config.hf_config, "dtype", None) or getattr(model_config.hf_config, "torch_dtype", None)
    if model_config.dtype == torch.float32 and stored in (torch.bfloat16, torch.float16, "bfloat16", "float16"):
        logger.info("vllm-metal: computing in float32 on MLX's CPU backend (the checkpoint stores %s, "
                    "which has no fast kernels there); --dtype overrides", str(stored).removeprefix("torch."))
