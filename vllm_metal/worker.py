"""MetalWorker: vLLM's V1 worker contract on top of MLX.

The engine calls, in order: ``init_device``, ``load_model``, ``get_kv_cache_spec``,
``determine_available_memory`` (we profile one full prefill), ``initialize_from_config``
(allocate the paged KV pools), ``compile_or_warm_up_model``, then ``execute_model`` /
``sample_tokens`` per step, and ``shutdown``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time

import mlx.core as mx
import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheSpec
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from vllm_metal import distributed, envs, patches
from vllm_metal.device import describe_device, device_memory_bytes, on_gpu, select_device
from vllm_metal.model_runner import MetalModelRunner

logger = init_logger("vllm.metal")

CPU_AUTO_KV_CAP = 4 * 2**30  # MLX's CPU backend shares RAM with everything else
AUTO_FRACTION = 0.9  # VLLM_METAL_MEMORY_FRACTION=auto (the seed's table)
VLLM_DEFAULT_UTILIZATION = 0.92  # CacheConfig.gpu_memory_utilization's default in vLLM 0.32
MIN_BUFFER_CACHE = 256 * 2**20
PROBE_TOKENS = 128  # prefill size measured on MLX's CPU backend (see _activation_peak)


class MetalWorker(WorkerBase):
    def __init__(self, vllm_config: VllmConfig, local_rank: int, rank: int,
                 distributed_init_method: str, is_driver_worker: bool = False):
        super().__init__(vllm_config, local_rank, rank, distributed_init_method, is_driver_worker)
        self.envs = envs.load()
        self.model_runner: MetalModelRunner | None = None
        self.blas_threads: patches.mlx.CpuBlasThreads | None = None  # MLX's CPU backend with a CBLAS loaded
        self.activation_bytes = 0
        self.group: mx.distributed.Group | None = None  # --tensor-parallel-size > 1: the ranks' MLX group
        parallel = vllm_config.parallel_config
        self.plan = (distributed.Plan.from_config(vllm_config.additional_config[distributed.CONFIG_KEY])
                     if parallel.world_size > 1 else None)
        if self.plan is not None and self.plan.backend == "nccl":
            distributed.pin_gpu(local_rank)  # before MLX first touches CUDA

    def init_device(self) -> None:
        device = select_device(self.envs.mlx_device)
        self.device = torch.device("cpu")
        seed = self.model_config.seed
        if seed is not None:
            mx.random.seed(seed)
            torch.manual_seed(seed)
        logger.info("vllm-metal: worker on MLX %s (%s)", describe_device(), device)
        if self.plan is not None:
            self._join_ranks()
        if not on_gpu():
            logger.info("vllm-metal: MLX's CPU matmuls use %s (VLLM_METAL_CPU_BLAS=%s)",
                        patches.mlx.CPU_BLAS or "the BLAS MLX's wheel links", self.envs.cpu_blas)
        self.model_runner = MetalModelRunner(self.vllm_config, self.envs, self.group)
        if not on_gpu() and patches.mlx.CPU_BLAS is not None:
            self.blas_threads = patches.mlx.CpuBlasThreads(
                self.envs.cpu_blas_threads, (os.cpu_count() or 1) // self.ranks_per_device)
            self.blas_threads.for_step(1)

    def _join_ranks(self) -> None:
        """vLLM's process groups (its control plane across machines: scheduler output and results
        travel through them when the ranks span several; gloo, nothing on the device), then the
        MLX group the model's sharded layers sum over. Ranks on one machine's CPU split its cores."""
        from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

        parallel = self.parallel_config
        init_distributed_environment(parallel.world_size, self.rank, self.distributed_init_method,
                                     self.local_rank, "gloo")
        ensure_model_parallel_initialized(parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
        self.group = distributed.join(self.plan, self.rank, self.local_rank)
        logger.info("vllm-metal: rank %d of %d joined MLX's %s group", self.rank, parallel.world_size,
                    self.plan.backend)

    @property
    def ranks_per_device(self) -> int:
        """Ranks whose MLX device is this one: every rank on this machine where the device is its
        memory (the CPU, an Apple GPU's unified memory), one per GPU on CUDA."""
        if self.plan is None or self.plan.backend == "nccl":
            return 1
        return self.parallel_config.local_world_size

    @contextlib.contextmanager
    def _ranks_in_step(self):
        """A rank that fails a step leaves the others waiting in a collective for it, so with
        several ranks a failed step ends this process: vLLM's executor sees a rank die and shuts
        the engine down with that reason instead of hanging."""
        try:
            yield
        except Exception:
            if self.group is None:
                raise
            logger.exception("vllm-metal: rank %d of %d failed a step; the other ranks cannot go on "
                             "without it, so this rank exits and the engine shuts down",
                             self.rank, self.group.size())
            os._exit(1)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        if load_dummy_weights:
            raise ValueError("vllm-metal cannot load dummy weights (--load-format dummy).")
        self.model_runner.load_model()

    def get_model(self):
        return self.model_runner.loaded.model

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        return self.model_runner.get_kv_cache_spec()

    def get_supported_kv_cache_layouts(self) -> list[str]:
        return ["NHD"]

    def determine_available_memory(self) -> int:
        """Bytes the KV cache may take: explicit ``--kv-cache-memory-bytes``, else a fraction of
        device memory minus weights and the activation peak of the worst step the configuration
        allows (``MetalModelRunner.worst_step``). Either way the three must fit the device."""
        runner = self.model_runner
        total = device_memory_bytes() // self.ranks_per_device
        weights = runner.weight_bytes
        activations = self._activation_peak()
        self.activation_bytes = activations
        explicit = self.cache_config.kv_cache_memory_bytes
        if explicit is not None:
            self._check_explicit_budget(int(explicit), total, weights, activations)
            self._reserve_state(total - weights - activations - int(explicit), fits_half=False)
            return int(explicit)
        fraction = self.memory_fraction()
        available = int(total * fraction) - weights - activations
        cap = ""
        if not on_gpu() and self.envs.memory_fraction == "auto":
            if available > CPU_AUTO_KV_CAP // self.ranks_per_device:
                available, cap = CPU_AUTO_KV_CAP // self.ranks_per_device, " (capped on MLX's CPU backend)"
        available -= self._reserve_state(available, fits_half=True)
        if available < runner.kv_bytes_per_block():
            raise ValueError(
                f"vllm-metal: no memory left for the KV cache: {total / 2**30:.1f} GiB device "
                f"memory x {fraction} is less than weights {weights / 2**30:.2f} GiB + activations "
                f"{activations / 2**30:.2f} GiB (the largest step --max-num-batched-tokens "
                f"{self.scheduler_config.max_num_batched_tokens} and --max-num-seqs "
                f"{self.scheduler_config.max_num_seqs} allow). Raise VLLM_METAL_MEMORY_FRACTION or "
                "--gpu-memory-utilization, lower --max-num-batched-tokens, --max-num-seqs or "
                "VLLM_METAL_ATTENTION_MB, or set --kv-cache-memory-bytes."
            )
        logger.info(
            "vllm-metal: KV budget %.2f GiB%s = %.1f GiB device x %s - weights %.2f GiB - "
            "activations %.0f MiB",
            available / 2**30, cap, total / 2**30, fraction, weights / 2**30, activations / 2**20,
        )
        return available

    def _reserve_state(self, room: int, fits_half: bool) -> int:
        """Bytes reserved for recurrent state (hybrid models; 0 otherwise): one request's state
        (``MetalModelRunner.state_bytes_per_request``) for each of ``--max-num-seqs`` requests,
        out of ``room`` bytes. With ``fits_half`` (the KV budget is derived, not given) the state
        may take at most half of ``room``, and ``--max-num-seqs`` is lowered to what fits, with a
        log line; the scheduler, created after this in the engine process, admits that many."""
        runner = self.model_runner
        per_request = runner.state_bytes_per_request()
        if not per_request:
            return 0
        seqs = self.scheduler_config.max_num_seqs
        fit = max(room // 2 if fits_half else room, 0) // per_request
        if fit < 1:
            raise ValueError(
                f"vllm-metal: no memory left for the recurrent state of one request "
                f"({per_request / 2**20:.1f} MiB): raise VLLM_METAL_MEMORY_FRACTION or "
                "--gpu-memory-utilization, or lower --max-num-batched-tokens or --kv-cache-memory-bytes.")
        if fit < seqs:
            if not fits_half:
                raise ValueError(
                    f"vllm-metal: recurrent state for --max-num-seqs {seqs} requests "
                    f"({seqs * per_request / 2**30:.2f} GiB, {per_request / 2**20:.1f} MiB each) does not "
                    f"fit beside --kv-cache-memory-bytes: lower --max-num-seqs to {fit} or less, or "
                    "lower --kv-cache-memory-bytes.")
            logger.info("vllm-metal: --max-num-seqs lowered from %d to %d: each running request holds "
                        "%.1f MiB of recurrent state, reserved up front, and the state may take at most "
                        "half of the %.2f GiB left for caches", seqs, fit, per_request / 2**20, room / 2**30)
            seqs = self.scheduler_config.max_num_seqs = fit
        runner.max_num_reqs = seqs
        logger.info("vllm-metal: recurrent state reserved for %d requests: %.1f MiB (%.2f MiB each)",
                    seqs, seqs * per_request / 2**20, per_request / 2**20)
        return seqs * per_request

    def memory_fraction(self) -> float:
        """VLLM_METAL_MEMORY_FRACTION when numeric; for ``auto``, --gpu-memory-utilization unless it
        equals vLLM's default, else 0.9. vLLM's config keeps no record of whether the flag was
        given (its engine arguments pass the 0.92 default explicitly), so a value equal to the
        default counts as not given."""
        if self.envs.memory_fraction != "auto":
            return float(self.envs.memory_fraction)
        utilization = self.cache_config.gpu_memory_utilization
        return AUTO_FRACTION if utilization == VLLM_DEFAULT_UTILIZATION else utilization

    def _check_explicit_budget(self, budget: int, total: int, weights: int, activations: int) -> None:
        """vLLM's own message for a budget below one full-length request says 0.0 GiB and points
        at --gpu-memory-utilization, which --kv-cache-memory-bytes overrides; name the real knobs.
        A budget that leaves no room for the weights and the largest step is refused too."""
        from vllm.v1.core.kv_cache_utils import (
            check_enough_kv_cache_memory,
            estimate_max_model_len,
            max_memory_usage_bytes,
        )

        runner = self.model_runner
        per_block = runner.kv_bytes_per_block()
        max_len = self.model_config.max_model_len
        specs = runner.get_kv_cache_spec()
        try:  # vLLM's own test: sliding windows count, and the block its pool holds back
            check_enough_kv_cache_memory(self.vllm_config, specs, budget)
        except ValueError:
            need = max_memory_usage_bytes(self.vllm_config, specs.values()) + per_block
            fits = max(estimate_max_model_len(self.vllm_config, specs, budget - per_block), 0)
            shorter = f", or lower --max-model-len to {fits} or less" if fits else ""
            raise ValueError(
                f"vllm-metal: --kv-cache-memory-bytes {budget} holds {fits} tokens of KV cache, "
                f"less than one --max-model-len {max_len} request needs ({need} bytes). Raise "
                f"--kv-cache-memory-bytes to at least {need}{shorter}."
            ) from None
        if weights + budget + activations > total:
            raise ValueError(
                f"vllm-metal: --kv-cache-memory-bytes {budget} ({budget / 2**30:.2f} GiB) + weights "
                f"{weights / 2**30:.2f} GiB + activations {activations / 2**30:.2f} GiB (the largest "
                f"step --max-num-batched-tokens {self.scheduler_config.max_num_batched_tokens} and "
                f"--max-num-seqs {self.scheduler_config.max_num_seqs} allow) exceed the device's "
                f"{total / 2**30:.1f} GiB. Lower --kv-cache-memory-bytes, --max-num-batched-tokens, "
                "--max-num-seqs or VLLM_METAL_ATTENTION_MB."
            )
        logger.info("vllm-metal: KV budget %.2f GiB (--kv-cache-memory-bytes); weights %.2f GiB, "
                    "activations %.0f MiB, device %.1f GiB", budget / 2**30, weights / 2**30,
                    activations / 2**20, total / 2**30)

    def _activation_peak(self) -> int:
        """Peak MLX memory of the worst step beyond weights and KV cache.

        Measured directly on a GPU. MLX's CPU backend runs a 2048-token prefill of even a 135M
        model for seconds, so there we measure prefills of PROBE_TOKENS / 2 and PROBE_TOKENS and
        extrapolate: a fixed part, a per-token part linear in the step's tokens, a logits row per
        sequence, and the most the step's attention holds at once where the KV backend bounds it
        (``KVBackend.attention_bound``).
        """
        runner = self.model_runner
        lens, starts = runner.worst_step()
        if on_gpu():
            return runner.profile_step(lens, starts)
        probe = max(1, min(sum(lens), PROBE_TOKENS, self.model_config.max_model_len) // 2)
        one, two = runner.profile_step([probe], [0]), runner.profile_step([2 * probe], [0])
        per_token = max(two - one, 0) / probe
        linear = int(max(one - per_token * probe, 0) + per_token * sum(lens))
        logits_rows = len(lens) * runner.vocab_size * 4 * 2  # float32 logits and their torch copy
        return linear + logits_rows + runner.kv.attention_bound(lens, starts)

    def initialize_from_config(self, kv_cache_config: KVCacheConfig) -> None:
        self.model_runner.initialize_kv_cache(kv_cache_config)
        # MLX keeps freed buffers for reuse, by default up to its whole memory limit; bound that
        # cache by one step's activations so memory under load stays weights + KV + one step.
        limit = max(self.activation_bytes, MIN_BUFFER_CACHE)
        mx.set_cache_limit(limit)
        logger.info("vllm-metal: MLX buffer cache capped at %.0f MiB", limit / 2**20)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        start = time.perf_counter()
        self.model_runner.warm_up(min(16, self.scheduler_config.max_num_batched_tokens))
        logger.info("vllm-metal: warm-up took %.2fs", time.perf_counter() - start)
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def get_cache_block_size_bytes(self) -> int:
        return self.model_runner.kv_bytes_per_block()

    def get_supported_tasks(self) -> tuple[str, ...]:
        pooling = self.model_runner.pooling
        return ("generate",) if pooling is None else pooling.supported_tasks()

    def execute_model(self, scheduler_output):
        if self.blas_threads is not None:
            self.blas_threads.for_step(len(scheduler_output.num_scheduled_tokens))
        with self._ranks_in_step():
            return self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output):
        with self._ranks_in_step():
            return self.model_runner.sample_tokens(grammar_output)

    def take_draft_token_ids(self):
        speculation = self.model_runner.speculation
        return None if speculation is None else speculation.take()

    def execute_dummy_batch(self) -> None:
        self.model_runner.profile_step([1], [0])

    def synchronize_device(self) -> None:
        mx.synchronize()

    def check_health(self) -> None:
        if self.model_runner is None or self.model_runner.loaded is None:
            raise RuntimeError("vllm-metal worker has no model loaded")

    def update_max_model_len(self, max_model_len: int) -> None:
        self.model_config.max_model_len = max_model_len
        if self.model_runner is not None:
            self.model_runner.max_model_len = max_model_len

    def add_lora(self, lora_request) -> bool:
        self.model_runner.loras.add(lora_request.lora_int_id, lora_request.lora_path)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        return self.model_runner.loras.remove(lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        return lora_id in self.model_runner.loras.ids()  # adapters stay loaded until removed

    def list_loras(self) -> set[int]:
        return set() if self.model_runner.loras is None else self.model_runner.loras.ids()

    def shutdown(self) -> None:
        if self.model_runner is not None:
            self.model_runner.kv = None
            self.model_runner.loaded = None
        gc.collect()
        mx.clear_cache()
