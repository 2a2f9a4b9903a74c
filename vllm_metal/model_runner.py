"""MetalModelRunner: one ``SchedulerOutput`` in, one packed MLX forward, one ``ModelRunnerOutput`` out.

Request bookkeeping is vLLM's own persistent ``InputBatch`` (token history, block tables,
sampling params, logits-processor state). The forward pass and the KV cache are MLX: the model
from ``loader.py``, the cache behind the ``KVBackend`` interface (``paged.py``, or
``mlx_cache.py`` with VLLM_METAL_USE_PAGED_ATTENTION=0).

Sampling takes one of two paths per step. Where every request of the step asks only for what
``sampling.py`` does on the device (greedy, temperature, top-k/p, min-p, logit bias), the step is sampled in
MLX and nothing waits for the device (one step ahead, VLLM_METAL_ONE_STEP_AHEAD):
``sample_tokens`` returns a ``DeviceSampledOutput`` at once, with the token ids still being
computed; the runner holds a placeholder (``PLACEHOLDER``) in their place, the next step's forward
reads them from the device array as its input ids, and vLLM's engine, which schedules that next
step meanwhile, reads them later through ``get_output``. Otherwise the step is sampled by vLLM's
``Sampler`` on the host (penalties, seeds, logprobs, grammars: ``sampling.host_reason``),
after the runner has waited for every token still on the device.
"""

from __future__ import annotations

import gc
import json
import math
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.sampling_params import SamplingType
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec, SlidingWindowSpec
from vllm.v1.outputs import (
    EMPTY_MODEL_RUNNER_OUTPUT,
    AsyncModelRunnerOutput,
    LogprobsTensors,
    ModelRunnerOutput,
)
from vllm.v1.sample.logits_processor import build_logitsprocs
from vllm.v1.sample.sampler import Sampler
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from vllm_metal import envs, paged_kernel, quant_kernel
from vllm_metal.attention import attention_limits
from vllm_metal.bridge import mlx_to_torch
from vllm_metal.device import EvalTimer, device_memory_bytes, gpu_backend, on_gpu
from vllm_metal.kv_backend import KVBackend, StepBatch
from vllm_metal.loader import LoadedModel, load, resolve_model_dir
from vllm_metal.lora import LoRAs
from vllm_metal.mlx_cache import MlxManagedBackend
from vllm_metal.mlx_lm_models import (
    CUDA_DEQUANTIZE_ROWS,
    UnsupportedModelError,
    dequantize_large_products,
    use_quantized_kernel,
)
from vllm_metal.paged import PagedBackend
from vllm_metal.pooling import Pooling
from vllm_metal.sampling import RowParams, host_reason, sample
from vllm_metal.scheduler import FailedStep, MetalAsyncScheduler, MetalScheduler
from vllm_metal.speculative import Speculation, first_rows, scheduled_drafts, speculation_for

logger = init_logger("vllm.metal")

MIN_ATTENTION_BUDGET = 64 * 2**20
MAX_ATTENTION_BUDGET = 2**30
STEP_LOG_PREFIX = "vllm-metal step: "
PLACEHOLDER = -1  # a sampled token id the device has not returned yet
OUR_SCHEDULERS = {f"{c.__module__}.{c.__qualname__}" for c in (MetalScheduler, MetalAsyncScheduler)}


def _layer_name(i: int) -> str:
    """The name vLLM knows layer ``i``'s KV cache by (its specs, groups and tensors)."""
    return f"model.layers.{i}.self_attn"


def attention_budget(setting: int | str) -> int:
    """Bytes one attention call may hold (VLLM_METAL_ATTENTION_MB; ``auto``: 1/64 of device memory,
    between 64 MiB and 1 GiB)."""
    if setting != "auto":
        return int(setting) * 2**20
    return min(MAX_ATTENTION_BUDGET, max(MIN_ATTENTION_BUDGET, device_memory_bytes() // 64))


@dataclass
class StepRecord:
    """One step's shape, host timings (ms) and memory. VLLM_METAL_DEBUG logs each as one JSON
    object after ``STEP_LOG_PREFIX`` (``from_log`` reads it back). The timings split the step where the engine calls us:
    ``forward_ms`` (execute_model; of it ``launch_ms`` encodes and submits the kernels and
    ``wait_ms`` waits for the device: for this step, or with one step ahead for the previous one
    (VLLM_METAL_KV_IN_PLACE); the rest is state, metadata and recording the graph),
    ``between_ms`` (until sample_tokens is called), ``sample_ms``, and ``outside_ms`` (from the
    previous step's sample to this execute_model: the engine's scheduling and output handling)."""

    reqs: int
    tokens: int
    decode: int
    forward_ms: float
    launch_ms: float
    wait_ms: float
    between_ms: float = 0.0
    sample_ms: float = 0.0
    outside_ms: float = math.nan
    kv_mib: float = 0.0
    restored_tokens: int = 0  # prefix tokens restored from snapshots, since start
    moved_blocks: int = 0  # block ids whose K/V placement moved in this step
    peak_mib: float = 0.0  # MLX peak above weights and KV since the previous record
    on_device: bool = False  # sampled in MLX, one step ahead (sample_ms: building the sampler)

    @classmethod
    def from_log(cls, line: str) -> StepRecord | None:
        """The record a VLLM_METAL_DEBUG log line carries, or None for any other line."""
        _, sep, payload = line.partition(STEP_LOG_PREFIX)
        return cls(**json.loads(payload)) if sep else None


@dataclass
class _PendingStep:
    """What ``execute_model`` leaves for ``sample_tokens``: logits and which rows mean what."""

    scheduler_output: SchedulerOutput
    logits: mx.array  # (num_reqs + prompt rows, vocab)
    partial: list[bool]  # request still in prefill after this step: its sample is discarded
    row_spans: dict[str, tuple[int, int, int]]  # all_rows requests: req_id -> (first logits row, count, start pos)
    started: float  # perf_counter at execute_model entry
    record: StepRecord


@dataclass
class DeviceSampledOutput(AsyncModelRunnerOutput):
    """A step sampled on the device: ``output`` without its token ids until ``get_output``, which
    waits for the device and also writes the ids where the runner holds placeholders."""

    runner: MetalModelRunner
    output: ModelRunnerOutput
    tokens: mx.array  # (rows,) int32, being computed
    rows: list[tuple[str, int, int, int]]  # (req_id, row, token position, output index) sampled
    scheduler_output: SchedulerOutput
    result: ModelRunnerOutput | None = field(default=None, init=False)

    def get_output(self) -> ModelRunnerOutput:
        return self.runner.resolve(self)


class MetalModelRunner:
    def __init__(self, vllm_config: VllmConfig, metal_envs: envs.MetalEnvs | None = None,
                 group: mx.distributed.Group | None = None):
        self.vllm_config = vllm_config
        self.group = group  # tensor parallelism: the ranks this one holds a shard beside
        self.model_config = vllm_config.model_config
        self.cache_config = vllm_config.cache_config
        self.scheduler_config = vllm_config.scheduler_config
        self.envs = metal_envs or envs.load()
        self.debug = self.envs.debug
        # the step's mx.eval (timed in parts when debugging)
        self.evaluate = EvalTimer(split=self.debug, in_place=self.envs.kv_in_place)
        self.device = torch.device("cpu")
        self.block_size = self.cache_config.block_size
        self.max_model_len = self.model_config.max_model_len
        self.max_num_reqs = self.scheduler_config.max_num_seqs
        self.max_num_tokens = self.scheduler_config.max_num_batched_tokens
        self.vocab_size = self.model_config.get_vocab_size()
        # a failed step is answered with FailedStep only where the scheduler knows what that is,
        # and by one rank only (ranks of a group fail together: MetalWorker)
        self.survives_failed_steps = (str(self.scheduler_config.scheduler_cls) in OUR_SCHEDULERS
                                      and group is None)
        self.requests: dict[str, CachedRequestState] = {}
        self.num_prompt_logprobs: dict[str, int] = {}
        self.sampler = Sampler(logprobs_mode=self.model_config.logprobs_mode)
        # --runner pooling: embeddings from the final hidden states instead of sampled tokens
        self.pooling = Pooling(self.model_config) if self.model_config.runner_type == "pooling" else None
        # --speculative-config: drafts verified in the packed forward, several tokens a step
        # (created in load_model: a draft model loads with the model)
        spec = vllm_config.speculative_config
        self.num_draft_tokens = 0 if spec is None else spec.num_speculative_tokens
        self.speculation: Speculation | None = None
        self.input_batch = self._new_input_batch(
            build_logitsprocs(vllm_config, self.device, False, False, ())
        )
        self.loaded: LoadedModel | None = None
        self.loras: LoRAs | None = None  # --enable-lora: the adapters vLLM has added
        self.kv: KVBackend | None = None  # created with the model, allocated by initialize_kv_cache
        self._num_blocks = 0
        self.layer_groups: list[int] | None = None  # each layer's KV cache group (initialize_kv_cache)
        self.layer_pools: list[int | None] | None = None  # each layer's pool (shared across groups)
        self.place_group = 0  # the full-attention group, whose blocks a lone sequence has placed
        self._pending: _PendingStep | FailedStep | None = None
        self._last_step_end = 0.0  # VLLM_METAL_DEBUG step timing
        # One step ahead: tokens sampled on the device that the host does not hold yet. vLLM's
        # multiprocess executor reads outputs on another thread, hence the lock.
        self.one_step_ahead = spec is None and (
            self.envs.one_step_ahead == "1" or (self.envs.one_step_ahead == "auto" and on_gpu()))
        self._lock = threading.RLock()
        self._late: dict[str, tuple[int, mx.array, int]] = {}  # req_id -> (position, ids, row)
        self._unresolved: list[DeviceSampledOutput] = []
        self._host_sampled: dict[str, str] = {}  # req_id -> the parameter only vLLM's Sampler applies
        self.evaluate.wait = not self.one_step_ahead

    def _new_input_batch(self, logitsprocs, groups: int = 1) -> InputBatch:
        return InputBatch(
            max_num_reqs=self.max_num_reqs,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=self.max_num_tokens,
            device=self.device,
            vocab_size=self.vocab_size,
            block_sizes=[self.block_size] * groups,
            max_num_blocks_per_req=[-(-self.max_model_len // self.block_size)] * groups,
            logitsprocs=logitsprocs,
            is_pooling_model=self.pooling is not None,
            num_spec_tokens=self.num_draft_tokens,
        )

    # ----------------------------------------------------------------- model and KV cache
    def load_model(self) -> None:
        path = resolve_model_dir(self.model_config.model)
        self.loaded = load(path, self.model_config.dtype, self.model_config.trust_remote_code, self.group)
        if self.pooling is not None:
            self.loaded.without_head()
        cuda = quant_kernel.on_cuda()
        rows = self.envs.dequantize_rows
        if rows == "auto":
            rows = CUDA_DEQUANTIZE_ROWS if cuda else 0
        dequantize_large_products(self.loaded.model, rows)
        self._use_quantized_kernel(cuda)
        if (lora := self.vllm_config.lora_config) is not None:
            self.loras = LoRAs(self.loaded.model, self.loaded.dtype, lora.max_lora_rank)
        self.speculation = speculation_for(self.vllm_config)
        if self.speculation is not None and self.state_bytes_per_request():
            raise UnsupportedModelError(
                "speculative decoding (--speculative-config) is not supported for models with "
                "recurrent-state layers: a rejected draft would have to be taken back out of the state.")
        self.kv = self._new_backend()

    def _use_quantized_kernel(self, cuda: bool) -> None:
        """VLLM_METAL_QUANTIZED_KERNEL: 4-bit products in ``quant_kernel`` where MLX computes on CUDA."""
        setting = self.envs.quantized_kernel
        if setting == "on" and not cuda:
            raise UnsupportedModelError(
                "VLLM_METAL_QUANTIZED_KERNEL=on needs MLX on an NVIDIA GPU (the kernel is CUDA only); "
                "MLX computes on " + ("Metal" if on_gpu() else "the CPU") + " here. Use auto or off.")
        if setting != "off" and cuda:
            use_quantized_kernel(self.loaded.model)

    @property
    def weight_bytes(self) -> int:
        """The model's weights and a draft model's."""
        return self.loaded.weight_bytes + (self.speculation.weight_bytes if self.speculation else 0)

    def _new_backend(self) -> KVBackend:
        """The KV cache kind VLLM_METAL_USE_PAGED_ATTENTION selects, not yet allocated."""
        if not self.envs.use_paged_attention:
            prefix = (int(self.envs.prefix_cache_fraction * device_memory_bytes())
                      if self.cache_config.enable_prefix_caching else 0)
            return MlxManagedBackend(self.loaded, self.block_size, self.max_model_len, prefix, self.evaluate)
        budget = attention_budget(self.envs.attention_mb)
        limits = attention_limits(self.loaded.specs, self.loaded.dtype, budget)
        return PagedBackend(self.loaded, self.block_size, self.max_model_len, limits, self.evaluate,
                            state_slots=self.max_num_reqs, layer_groups=self.layer_groups,
                            layer_pools=self.layer_pools, place_group=self.place_group,
                            kernel=self._attention_kernel())

    def _attention_kernel(self) -> paged_kernel.PagedKernel | None:
        """The paged attention kernel VLLM_METAL_ATTENTION_KERNEL selects for this model, or None
        (MLX ops). Under ``auto`` a model whose attention the kernel cannot take uses MLX ops."""
        setting = self.envs.attention_kernel
        try:
            kernel = paged_kernel.select(setting, gpu_backend(), on_gpu())
            for s in self.loaded.specs:
                if kernel is not None and s.state is None:
                    paged_kernel.check_geometry(s.q_heads, s.kv_heads, s.head_dim, s.v_head_dim)
        except paged_kernel.KernelUnsupported as e:
            if setting == "on":
                raise UnsupportedModelError(
                    f"VLLM_METAL_ATTENTION_KERNEL=on: the paged attention kernel cannot take this model ({e}); "
                    "use VLLM_METAL_ATTENTION_KERNEL=auto or off.") from e
            logger.info("vllm-metal: batched attention runs in MLX ops: the paged kernel cannot take %s", e)
            return None
        return kernel

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        """One spec per layer that holds K/V (not those reading another layer's, nor recurrent
        layers, whose state the worker reserves per request: ``state_bytes_per_request``).

        A sliding-window layer gets vLLM's sliding-window spec, so vLLM frees its blocks behind
        the window and admits requests by what their layers really hold, where the paged pools can
        share memory between such layers and full-attention ones: every K/V layer has the same
        geometry (vLLM then gives a block's memory to one layer of each group at a time). Otherwise
        every layer is full attention and windows are applied in the mask only."""
        dtype = self.model_config.dtype
        kv = {i: s for i, s in enumerate(self.loaded.specs) if s.holds_kv}
        geometry = {(s.kv_heads, s.head_dim, s.v_head_dim) for s in kv.values()}
        windows = self.envs.use_paged_attention and len(geometry) == 1
        specs: dict[str, KVCacheSpec] = {}
        for i, s in kv.items():
            shape = dict(block_size=self.block_size, num_kv_heads=s.kv_heads, head_size=s.head_dim,
                         head_size_v=s.v_head_dim, dtype=dtype)
            specs[_layer_name(i)] = (
                SlidingWindowSpec(**shape, sliding_window=s.window) if windows and s.window is not None
                else FullAttentionSpec(**shape))
        return specs

    def kv_bytes_per_block(self) -> int:
        item = self.loaded.dtype.size
        return sum(
            self.block_size * s.kv_heads * (s.head_dim + s.v_head_dim) * item for s in self.loaded.specs
            if s.holds_kv
        )

    def state_bytes_per_request(self) -> int:
        """Bytes of recurrent state one running request holds (0 without recurrent layers). vLLM's
        hybrid allocator would page it with the K/V (one block holds either a request's state or
        tokens' K/V, in shared memory MLX arrays cannot alias), so the worker reserves it for
        ``--max-num-seqs`` requests beside the KV cache instead."""
        return sum(a.nbytes for s in self.loaded.specs if s.state is not None for a in s.state)

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig) -> None:
        """Allocate the cache vLLM sized. With several groups (sliding-window and full-attention
        layers), each layer reads the block table of its group and writes a pool that vLLM's
        layout shares with one layer of each other group."""
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1 and not self.envs.use_paged_attention:
            raise UnsupportedModelError(f"expected one KV cache group, got {len(groups)}")
        self.block_size = groups[0].kv_cache_spec.block_size
        if any(g.kv_cache_spec.block_size != self.block_size for g in groups):
            raise UnsupportedModelError("KV cache groups with different block sizes are not supported")
        self.input_batch = self._new_input_batch(self.input_batch.logitsprocs, len(groups))
        self._num_blocks = kv_cache_config.num_blocks
        group_of = {name: g for g, group in enumerate(groups) for name in group.layer_names}
        # A layer's pages start at the same byte as another's exactly where vLLM overlays groups
        # on one memory (a block id belongs to one group at a time): those layers share a pool.
        starts = {name: t.offset + k * t.layer_stride for t in kv_cache_config.kv_cache_tensors
                  for k, name in enumerate(t.layers)}
        pools = {start: p for p, start in enumerate(dict.fromkeys(starts.values()))}
        names = [_layer_name(i) for i in range(len(self.loaded.specs))]
        self.layer_groups = [group_of.get(n, 0) for n in names]
        self.layer_pools = [pools[starts[n]] if n in starts else None for n in names] if starts else None
        self.place_group = next((g for g, group in enumerate(groups)
                                 if not isinstance(group.kv_cache_spec, SlidingWindowSpec)), 0)
        self.kv = self._new_backend()
        self.kv.allocate(self._num_blocks)
        logger.info("vllm-metal: %s", self.kv.describe())

    def worst_step(self) -> tuple[list[int], list[int]]:
        """The step that holds the most memory the scheduler can send (query lengths, first
        positions): ``--max-num-batched-tokens`` tokens in prefill chunks as long as
        ``--max-model-len``, each ending at that context, and, while ``--max-num-seqs`` leaves
        room, decode rows at that context taken from the last chunk (each needs a logits row)."""
        tokens, seqs, max_len = self.max_num_tokens, self.max_num_reqs, self.max_model_len
        lens: list[int] = []
        left = tokens
        while left > 0 and len(lens) < seqs:
            lens.append(min(left, max_len))
            left -= lens[-1]
        decodes = min(seqs - len(lens), lens[-1] - 1)
        lens[-1] -= decodes
        lens += [1] * decodes
        return lens, [max_len - n for n in lens]

    def profile_step(self, lens: list[int], starts: list[int]) -> int:
        """MLX memory one step of ``lens`` tokens from ``starts`` holds at its peak beyond what was
        allocated before and its scratch K/V (``KVBackend.profile``)."""
        return self.kv.profile(lens, starts)

    def warm_up(self, num_tokens: int) -> None:
        """Run what serving runs before the first request does (MLX's CUDA backend compiles
        kernels on first use; without this the first requests would wait for it)."""
        self.kv.warm_up(max(1, min(num_tokens, self.max_model_len)))

    # ----------------------------------------------------------------- request state
    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
            self.num_prompt_logprobs.pop(req_id, None)
            self._host_sampled.pop(req_id, None)
            self._late.pop(req_id, None)
            batch.remove_request(req_id)
        if scheduler_output.kv_cache_block_copies:
            self.kv.copy_blocks([(c.src_block_id, c.dst_block_id)
                                 for c in scheduler_output.kv_cache_block_copies])

        cached = scheduler_output.scheduled_cached_reqs
        scheduled = scheduler_output.num_scheduled_tokens.keys()
        for req_id in batch.req_id_to_index.keys() - (scheduled - cached.resumed_req_ids):
            batch.remove_request(req_id)

        to_add: list[CachedRequestState] = []
        for new in scheduler_output.scheduled_new_reqs:
            params, pooling = new.sampling_params, new.pooling_params
            if new.prompt_token_ids is None or (params is None) == (pooling is None) or (
                    (pooling is None) != (self.pooling is None)):
                raise ValueError("vllm-metal takes token ids (no prompt embeddings), sampled by a "
                                 "generating runner or pooled by a pooling runner.")
            if pooling is not None:
                self.pooling.prepare(pooling)
            generator = None
            if params is not None and params.sampling_type == SamplingType.RANDOM_SEED:
                generator = torch.Generator(device="cpu")
                generator.manual_seed(params.seed)
            state = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=new.prompt_token_ids,
                prompt_embeds=new.prompt_embeds,
                mm_features=new.mm_features,
                sampling_params=params,
                pooling_params=pooling,
                generator=generator,
                block_ids=new.block_ids,
                num_computed_tokens=new.num_computed_tokens,
                output_token_ids=[],
                lora_request=new.lora_request,
            )
            self.requests[new.req_id] = state
            reason = None if params is None else host_reason(params) or self._custom_logitsprocs
            if reason is not None:
                self._host_sampled[new.req_id] = reason
            if params is not None and params.prompt_logprobs is not None:
                self.num_prompt_logprobs[new.req_id] = (
                    self.vocab_size if params.prompt_logprobs == -1 else params.prompt_logprobs
                )
            to_add.append(state)

        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            state.num_computed_tokens = cached.num_computed_tokens[i]
            num_output = cached.num_output_tokens[i]
            new_blocks = cached.new_block_ids[i]
            index = batch.req_id_to_index.get(req_id)
            if req_id in cached.all_token_ids and num_output > 0:
                state.output_token_ids[:] = cached.all_token_ids[req_id][-num_output:]
            elif num_output < len(state.output_token_ids):
                del state.output_token_ids[num_output:]
                if index is not None:
                    batch.num_tokens_no_spec[index] = batch.num_prompt_tokens[index] + num_output
            if req_id in cached.resumed_req_ids:
                state.block_ids = new_blocks
                self._late.pop(req_id, None)  # its history is the scheduler's now
            elif new_blocks is not None:
                for ids, extra in zip(state.block_ids, new_blocks, strict=True):
                    ids.extend(extra)
            if index is None:
                to_add.append(state)
                continue
            batch.num_computed_tokens_cpu[index] = state.num_computed_tokens
            if new_blocks is not None:
                batch.block_table.append_row(new_blocks, index)

        for state in to_add:
            batch.add_request(state)
        batch.condense()
        batch.refresh_metadata()
        if self.speculation is not None:  # drafts go in the token history after the next token
            for req_id in batch.req_ids:
                batch.update_req_spec_token_ids(self.requests[req_id], scheduler_output.scheduled_spec_decode_tokens)
        # finished and preempted requests free their caches; one merely not scheduled keeps them
        self.kv.keep_only(set(self.requests) - (scheduler_output.preempted_req_ids or set()))

    # ----------------------------------------------------------------- one step
    @property
    def _custom_logitsprocs(self) -> str | None:
        """``--logits-processors`` beyond vLLM's built-in ones run on the host for every request."""
        custom = [p for p in self.input_batch.logitsprocs.all
                  if not type(p).__module__.startswith("vllm.v1.sample.logits_processor")]
        return "logits_processors" if custom else None

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        with self._lock:
            try:
                return self._execute(scheduler_output)
            except Exception as exc:  # noqa: BLE001 - any failure of the step, MLX's above all
                if not self.survives_failed_steps:
                    raise
                self._pending = self._fail_step(scheduler_output, exc)
                return None

    def _execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        started = time.perf_counter()
        self._update_states(scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        if self._late and not self.kv.reads_late_tokens:
            self._resolve_all()
        step = self._step_batch(scheduler_output)
        moved_before = self.kv.moved_blocks
        if self.loras is None:
            logits = self.kv.forward(step)
        else:
            requests = [self.requests[r].lora_request for r in step.req_ids]
            for request in requests:  # vLLM adds adapters ahead (--lora-modules) or with a request
                if request is not None and request.lora_int_id not in self.loras.ids():
                    self.loras.add(request.lora_int_id, request.lora_path)
            with self.loras.step([0 if r is None else r.lora_int_id for r in requests], step.lens):
                logits = self.kv.forward(step)
        ends = [s + n for s, n in zip(step.starts, step.lens, strict=True)]
        partial = [end < self.input_batch.num_tokens_no_spec[i] for i, end in enumerate(ends)]
        record = StepRecord(
            reqs=len(step.req_ids), tokens=step.num_tokens, decode=step.lens.count(1),
            forward_ms=(time.perf_counter() - started) * 1e3,
            launch_ms=self.evaluate.launch_s * 1e3, wait_ms=self.evaluate.wait_s * 1e3,
            moved_blocks=self.kv.moved_blocks - moved_before,
        )
        pending = _PendingStep(scheduler_output, logits, partial, step.row_spans(), started, record)
        if self.pooling is None:
            self._pending = pending
            return None
        pooled = time.perf_counter()  # logits are every scheduled position's hidden state, after a row per request
        output = self.pooling.output(self.input_batch, step.lens, step.starts, logits[len(step.req_ids):])
        if self.debug:
            self._log_step(pending, pooled)  # sample_ms: the pooling
        return output

    def _step_batch(self, scheduler_output: SchedulerOutput) -> StepBatch:
        """The step's work in batch order, from the input batch the update just brought current."""
        batch = self.input_batch
        table = batch.block_table[0]
        step = StepBatch([], [], [], [], [], [], [])
        others = [batch.block_table[g] for g in range(1, len(batch.block_table.block_tables))]
        step.group_tables = [[] for _ in others]
        late: dict[int, tuple[mx.array, list[int], list[int]]] = {}  # by array: (ids, rows, packed index)
        offset = 0
        for i, req_id in enumerate(batch.req_ids):
            n = scheduler_output.num_scheduled_tokens[req_id]
            start = int(batch.num_computed_tokens_cpu[i])
            drafts = len(batch.spec_token_ids[i])
            if start + n > batch.num_tokens_no_spec[i] + drafts:
                raise self._history_error(scheduler_output, req_id, start, n)
            if (held := self._late.get(req_id)) is not None and start <= held[0] < start + n:
                ids, rows, index = late.setdefault(id(held[1]), (held[1], [], []))
                rows.append(held[2])
                index.append(offset + held[0] - start)
            offset += n
            step.req_ids.append(req_id)
            step.lens.append(n)
            step.starts.append(start)
            step.histories.append(batch.token_ids_cpu[i, : start + n])
            step.tables.append(table.block_table.np[i, : table.num_blocks_per_row[i]])
            for tables, other in zip(step.group_tables, others, strict=True):
                tables.append(other.block_table.np[i, : other.num_blocks_per_row[i]])
            step.all_rows.append(req_id in self.num_prompt_logprobs or self.pooling is not None or drafts > 0)
            step.prompt_lens.append(int(batch.num_prompt_tokens[i]))
        if late:
            parts = list(late.values())
            step.late = (np.concatenate([np.array(index) for _, _, index in parts]),
                         mx.concatenate([ids[mx.array(rows)] for ids, rows, _ in parts]))
        return step

    def _history_error(self, scheduler_output: SchedulerOutput, req_id: str, start: int, n: int) -> RuntimeError:
        """The scheduler asks for positions the runner holds no tokens for: say what each side holds."""
        state = self.requests[req_id]
        cached = scheduler_output.scheduled_cached_reqs
        said = "a new request"
        if req_id in cached.req_ids:
            i = cached.req_ids.index(req_id)
            said = (f"resumed={req_id in cached.resumed_req_ids} num_output={cached.num_output_tokens[i]} "
                    f"all_token_ids={len(cached.all_token_ids.get(req_id, ())) or None}")
        held = int(self.input_batch.num_tokens_no_spec[self.input_batch.req_id_to_index[req_id]])
        return RuntimeError(
            f"vllm-metal: request {req_id} is scheduled for positions {start}..{start + n - 1} but the "
            f"runner holds {held} tokens ({len(state.prompt_token_ids or [])} prompt + "
            f"{len(state.output_token_ids)} output); the runner's token history and the scheduler's "
            f"disagree (this step's update: {said})."
        )

    def sample_tokens(self, grammar_output) -> ModelRunnerOutput | DeviceSampledOutput:
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return EMPTY_MODEL_RUNNER_OUTPUT
            if isinstance(pending, FailedStep):
                return pending
            try:
                if self._samples_on_device(pending, grammar_output):
                    return self._sample_on_device(pending)
                self._resolve_all()
                return self._sample(pending, grammar_output)
            except Exception as exc:  # noqa: BLE001 - as in execute_model
                if not self.survives_failed_steps:
                    raise
                return self._fail_step(pending.scheduler_output, exc)

    def _samples_on_device(self, pending: _PendingStep, grammar_output) -> bool:
        return (self.one_step_ahead and grammar_output is None and not pending.row_spans
                and self._host_sampled.keys().isdisjoint(self.input_batch.req_ids))

    def _sample_on_device(self, pending: _PendingStep) -> DeviceSampledOutput:
        """Sample in MLX and return before the device is done; placeholders stand for the ids."""
        entered = time.perf_counter()
        batch = self.input_batch
        n = len(pending.partial)
        tokens = sample(pending.logits[:n], RowParams.of([self.requests[r].sampling_params for r in batch.req_ids]))
        mx.async_eval(tokens)
        output = ModelRunnerOutput(req_ids=list(batch.req_ids), req_id_to_index=dict(batch.req_id_to_index),
                                   sampled_token_ids=[[] for _ in range(n)])
        rows: list[tuple[str, int, int, int]] = []
        for i, req_id in enumerate(batch.req_ids):
            if pending.partial[i]:
                continue
            state = self.requests[req_id]
            end = int(batch.num_tokens_no_spec[i])
            if end < self.max_model_len:
                batch.token_ids_cpu[i, end] = PLACEHOLDER
                batch.is_token_ids[i, end] = True
            batch.num_tokens_no_spec[i] = end + 1
            rows.append((req_id, i, end, len(state.output_token_ids)))
            state.output_token_ids.append(PLACEHOLDER)
            self._late[req_id] = (end, tokens, i)
        result = DeviceSampledOutput(self, output, tokens, rows, pending.scheduler_output)
        self._unresolved.append(result)
        if self.debug:
            pending.record.on_device = True
            self._log_step(pending, entered)
        return result

    def resolve(self, sampled: DeviceSampledOutput) -> ModelRunnerOutput:
        """Wait for a device-sampled step's token ids; put them in its output and in place of the
        placeholders the runner still holds for them."""
        with self._lock:
            if sampled.result is not None:
                return sampled.result
            try:
                values = sampled.tokens.tolist()
            except Exception as exc:  # noqa: BLE001 - the step's evaluation failed on the device
                if not self.survives_failed_steps:
                    raise
                sampled.result = self._fail_step(sampled.scheduler_output, exc)
                return sampled.result
            self._unresolved.remove(sampled)
            batch = self.input_batch
            for req_id, row, position, out_index in sampled.rows:
                token = values[row]
                sampled.output.sampled_token_ids[row] = [token]
                if (held := self._late.get(req_id)) is not None and held[1] is sampled.tokens:
                    del self._late[req_id]
                state = self.requests.get(req_id)
                if (state is not None and out_index < len(state.output_token_ids)
                        and state.output_token_ids[out_index] == PLACEHOLDER):
                    state.output_token_ids[out_index] = token
                index = batch.req_id_to_index.get(req_id)
                if (index is not None and position < min(self.max_model_len, batch.num_tokens_no_spec[index])
                        and batch.token_ids_cpu[index, position] == PLACEHOLDER):
                    batch.token_ids_cpu[index, position] = token
            sampled.result = sampled.output
            return sampled.output

    def _resolve_all(self) -> None:
        """Wait for every token still on the device (vLLM's Sampler needs the histories)."""
        for sampled in list(self._unresolved):
            self.resolve(sampled)

    def _fail_step(self, scheduler_output: SchedulerOutput, exc: Exception) -> FailedStep:
        """A step failed (an MLX evaluation out of device memory, say): log it with the knobs that
        bound a step's memory, clear the K/V cache (a failed evaluation leaves the pools it was
        updating unusable) and the runner's batch, and answer with a ``FailedStep`` naming the
        step's requests. The scheduler (``vllm_metal.scheduler``) finishes those with an error and
        recomputes the other running requests."""
        req_ids = list(scheduler_output.num_scheduled_tokens)
        logger.error(
            "vllm-metal: a step of %d request(s), %d token(s) failed: %s: %s. Its requests finish with "
            "an error, the KV cache is cleared, and the engine keeps serving. If this is out of memory: "
            "lower --max-num-batched-tokens or --max-num-seqs, lower VLLM_METAL_ATTENTION_MB, or leave "
            "more memory free (--kv-cache-memory-bytes, VLLM_METAL_MEMORY_FRACTION).\n%s",
            len(req_ids), scheduler_output.total_num_scheduled_tokens, type(exc).__name__, exc,
            "".join(traceback.format_exception(exc)),
        )
        error = f"{type(exc).__name__}: {exc}"
        exc.__traceback__ = None  # its frames hold the failed step's arrays
        del exc
        for sampled in self._unresolved:  # steps launched after it read the same pools
            sampled.result = FailedStep(req_ids=sampled.output.req_ids,
                                        req_id_to_index=sampled.output.req_id_to_index,
                                        error=f"an earlier step failed: {error}")
        self._unresolved.clear()
        self._late.clear()
        if self.speculation is not None:
            self.speculation.take()  # drafts for requests that are gone
        if self.loaded.row_select is not None:
            self.loaded.row_select.rows = None
        batch = self.input_batch
        for req_id in list(batch.req_ids):
            batch.remove_request(req_id)
        batch.condense()
        batch.refresh_metadata()
        self.kv.clear()
        gc.collect()
        mx.clear_cache()
        self.kv.allocate(self._num_blocks)
        return FailedStep(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                          error=error)

    def _sample(self, pending: _PendingStep, grammar_output) -> ModelRunnerOutput:
        entered = time.perf_counter()
        batch = self.input_batch
        n = len(pending.partial)
        logits = mlx_to_torch(pending.logits.astype(mx.float32))
        drafts = scheduled_drafts(batch) if self.speculation is not None else [[]] * n
        if any(drafts):  # vLLM's layout: per request its next token's row, then one per draft
            rows = [range(pending.row_spans[r][0], pending.row_spans[r][0] + len(d) + 1) if d else [i]
                    for i, (r, d) in enumerate(zip(batch.req_ids, drafts, strict=True))]
            step_logits = logits[torch.tensor([j for r in rows for j in r])]
        else:
            step_logits = logits[:n].clone()
        if grammar_output is not None:
            from vllm.v1.structured_output.utils import apply_grammar_bitmask

            apply_grammar_bitmask(pending.scheduler_output, grammar_output, batch, step_logits)
        first = first_rows([len(d) + 1 for d in drafts])
        sample_logits = step_logits if not any(drafts) else step_logits[torch.from_numpy(first)]

        # A request still prefilling gets no token; keep its seeded generator where it was.
        saved = {
            i: g.get_state() for i, g in batch.generators.items() if i < n and pending.partial[i]
        }
        out = self.sampler(sample_logits, batch.sampling_metadata)
        for i, state in saved.items():
            batch.generators[i].set_state(state)

        sampled = out.sampled_token_ids[:, 0].tolist()
        sampled_lists: list[list[int]] = []
        for i, req_id in enumerate(batch.req_ids):
            if pending.partial[i]:
                sampled_lists.append([])
                continue
            tokens = [sampled[i]]
            if drafts[i]:  # only verifiable requests get drafts (speculative.py)
                tokens = self.speculation.verify(step_logits[first[i]: first[i] + len(drafts[i]) + 1], drafts[i])
            sampled_lists.append(tokens)
            for token in tokens:
                end = int(batch.num_tokens_no_spec[i])
                if end < self.max_model_len:
                    batch.token_ids_cpu[i, end] = token
                    batch.is_token_ids[i, end] = True
                batch.num_tokens_no_spec[i] = end + 1
                self.requests[req_id].output_token_ids.append(token)
        if self.speculation is not None:
            self.speculation.propose(batch, sampled_lists, [self.requests[r].sampling_params for r in batch.req_ids])

        output = ModelRunnerOutput(
            req_ids=list(batch.req_ids),
            req_id_to_index=dict(batch.req_id_to_index),
            sampled_token_ids=sampled_lists,
            logprobs=out.logprobs_tensors.tolists() if out.logprobs_tensors is not None else None,
            prompt_logprobs_dict=self._prompt_logprobs(logits, pending.row_spans),
        )
        if self.debug:
            self._log_step(pending, entered)
        return output

    def _log_step(self, pending: _PendingStep, sample_entered: float) -> None:
        """VLLM_METAL_DEBUG: the step's ``StepRecord``, completed, as one JSON log line."""
        now = time.perf_counter()
        record = pending.record
        record.between_ms = (sample_entered - pending.started) * 1e3 - record.forward_ms
        record.sample_ms = (now - sample_entered) * 1e3
        if self._last_step_end:
            record.outside_ms = (pending.started - self._last_step_end) * 1e3
        self._last_step_end = now
        kv_bytes = self.kv.nbytes()
        record.kv_mib = kv_bytes / 2**20
        record.restored_tokens = self.kv.restored_tokens
        record.peak_mib = (mx.get_peak_memory() - self.loaded.weight_bytes - kv_bytes) / 2**20
        mx.reset_peak_memory()
        logger.info("%s%s", STEP_LOG_PREFIX, json.dumps(asdict(record)))

    def _prompt_logprobs(self, logits: torch.Tensor, row_spans) -> dict[str, LogprobsTensors | None]:
        """Logprobs of each prompt token given its prefix, gathered chunk by chunk."""
        result: dict[str, LogprobsTensors | None] = {}
        for req_id, (row0, count, start) in row_spans.items():
            if req_id not in self.num_prompt_logprobs:  # rows for drafts, not prompt logprobs
                continue
            state = self.requests[req_id]
            k = self.num_prompt_logprobs[req_id]
            num_prompt = len(state.prompt_token_ids)
            if state.in_progress_prompt_logprobs_cpu is None:
                state.in_progress_prompt_logprobs_cpu = LogprobsTensors.empty_cpu(num_prompt - 1, k + 1)
            acc = state.in_progress_prompt_logprobs_cpu
            remaining = num_prompt - (start + 1)
            num_logits = min(count, remaining)
            if count > remaining:
                result[req_id] = acc
                del self.num_prompt_logprobs[req_id]
                state.in_progress_prompt_logprobs_cpu = None
            if num_logits <= 0:
                continue
            targets = torch.tensor(state.prompt_token_ids[start + 1 : start + 1 + num_logits])
            scores = logits[row0 : row0 + num_logits]
            if self.model_config.logprobs_mode not in ("raw_logits", "processed_logits"):
                scores = self.sampler.compute_logprobs(scores)
            ids, lps, ranks, *_ = self.sampler.gather_logprobs(scores, k, targets)
            acc.logprob_token_ids[start : start + num_logits].copy_(ids)
            acc.logprobs[start : start + num_logits].copy_(lps)
            acc.selected_token_ranks[start : start + num_logits].copy_(ranks)
        return result

