"""MetalModelRunner: one ``SchedulerOutput`` in, one packed MLX forward, one ``ModelRunnerOutput`` out.

Request bookkeeping and sampling are vLLM's own: the persistent ``InputBatch`` (token history,
block tables, sampling params, logits-processor state) and the ``Sampler`` (temperature, top-k/p,
min-p, penalties, logit bias, min-tokens, logprobs, seeds), running on small CPU torch tensors.
The forward pass and the KV cache are MLX (``attention.py``, ``loader.py``).
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.sampling_params import SamplingType
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, LogprobsTensors, ModelRunnerOutput
from vllm.v1.sample.logits_processor import build_logitsprocs
from vllm.v1.sample.sampler import Sampler
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from vllm_metal import envs
from vllm_metal.attention import (
    AttnLimits,
    PagedKVStore,
    UnsupportedModelError,
    attention_limits,
    build_step_metadata,
)
from vllm_metal.bridge import mlx_to_torch
from vllm_metal.device import EvalTimer, device_memory_bytes
from vllm_metal.loader import LoadedModel, load, resolve_model_dir
from vllm_metal.mlx_cache import MlxManagedCaches, RequestWork
from vllm_metal.scheduler import FailedStep, MetalAsyncScheduler, MetalScheduler

logger = init_logger("vllm.metal")

MIN_ATTENTION_BUDGET = 64 * 2**20
MAX_ATTENTION_BUDGET = 2**30
OUR_SCHEDULERS = {f"{c.__module__}.{c.__qualname__}" for c in (MetalScheduler, MetalAsyncScheduler)}


def attention_budget(setting: int | str) -> int:
    """Bytes one attention call may hold (VLLM_METAL_ATTENTION_MB; ``auto``: 1/64 of device memory,
    between 64 MiB and 1 GiB)."""
    if setting != "auto":
        return int(setting) * 2**20
    return min(MAX_ATTENTION_BUDGET, max(MIN_ATTENTION_BUDGET, device_memory_bytes() // 64))


@dataclass
class _PendingStep:
    """What ``execute_model`` leaves for ``sample_tokens``: logits and which rows mean what."""

    scheduler_output: object
    logits: mx.array  # (num_reqs + prompt rows, vocab)
    num_reqs: int
    partial: list[bool]  # request still in prefill after this step: its sample is discarded
    prompt_rows: dict[str, tuple[int, int, int]]  # req_id -> (first logits row, count, start pos)
    num_tokens: int = 0
    num_decode: int = 0
    started: float = 0.0  # perf_counter at execute_model entry
    forward_s: float = 0.0  # execute_model's own time (state update, metadata, forward, eval)
    launch_s: float = 0.0  # ...of which mx.async_eval (VLLM_METAL_DEBUG only)
    wait_s: float = 0.0  # ...and waiting for the device
    moved_blocks: int = 0  # blocks the paged store's placement moved in this step


class MetalModelRunner:
    def __init__(self, vllm_config: VllmConfig, metal_envs: envs.MetalEnvs | None = None):
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.cache_config = vllm_config.cache_config
        self.scheduler_config = vllm_config.scheduler_config
        self.envs = metal_envs or envs.load()
        self.debug = self.envs.debug
        self.evaluate = EvalTimer(split=self.debug)  # the step's mx.eval (timed in parts when debugging)
        self.paged = self.envs.use_paged_attention
        self.device = torch.device("cpu")
        self.block_size = self.cache_config.block_size
        self.max_model_len = self.model_config.max_model_len
        self.max_num_reqs = self.scheduler_config.max_num_seqs
        self.max_num_tokens = self.scheduler_config.max_num_batched_tokens
        self.vocab_size = self.model_config.get_vocab_size()
        # a failed step is answered with FailedStep only where the scheduler knows what that is
        self.survives_failed_steps = str(self.scheduler_config.scheduler_cls) in OUR_SCHEDULERS
        self.requests: dict[str, CachedRequestState] = {}
        self.num_prompt_logprobs: dict[str, int] = {}
        self.sampler = Sampler(logprobs_mode=self.model_config.logprobs_mode)
        self.input_batch = self._new_input_batch(
            build_logitsprocs(vllm_config, self.device, False, False, ())
        )
        self.loaded: LoadedModel | None = None
        self.attention_limits: AttnLimits | None = None  # of the loaded model's layers
        self.kv: PagedKVStore | None = None
        self.mlx_caches: MlxManagedCaches | None = None  # VLLM_METAL_USE_PAGED_ATTENTION=0
        self._pending: _PendingStep | FailedStep | None = None
        self._verified = False
        self._last_step_end = 0.0  # VLLM_METAL_DEBUG step timing
        # req_id -> what the scheduler last said of it (named when its token history disagrees)
        self._last_update: dict[str, tuple] = {}

    def _new_input_batch(self, logitsprocs) -> InputBatch:
        return InputBatch(
            max_num_reqs=self.max_num_reqs,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=self.max_num_tokens,
            device=self.device,
            vocab_size=self.vocab_size,
            block_sizes=[self.block_size],
            max_num_blocks_per_req=[-(-self.max_model_len // self.block_size)],
            logitsprocs=logitsprocs,
            is_pooling_model=False,
        )

    # ----------------------------------------------------------------- model and KV cache
    def load_model(self) -> None:
        path = resolve_model_dir(self.model_config.model)
        self.loaded = load(path, self.model_config.dtype, self.model_config.trust_remote_code)
        self.attention_limits = attention_limits(self.loaded.specs, self.loaded.dtype,
                                                 attention_budget(self.envs.attention_mb))

    @property
    def num_layers(self) -> int:
        return len(self.loaded.specs)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        """One full-attention spec per layer; sliding windows are applied in the mask only."""
        dtype = self.model_config.dtype
        specs: dict[str, KVCacheSpec] = {}
        for i, s in enumerate(self.loaded.specs):
            specs[f"model.layers.{i}.self_attn"] = FullAttentionSpec(
                block_size=self.block_size,
                num_kv_heads=s.kv_heads,
                head_size=s.head_dim,
                head_size_v=s.v_head_dim,
                dtype=dtype,
            )
        return specs

    def kv_bytes_per_block(self) -> int:
        item = self.loaded.dtype.size
        return sum(
            self.block_size * s.kv_heads * (s.head_dim + s.v_head_dim) * item for s in self.loaded.specs
        )

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig) -> None:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise UnsupportedModelError(f"expected one KV cache group, got {len(groups)}")
        self.block_size = groups[0].kv_cache_spec.block_size
        self.input_batch = self._new_input_batch(self.input_batch.logitsprocs)
        self._num_blocks = kv_cache_config.num_blocks
        self._new_caches()
        if self.mlx_caches is not None:
            logger.info(
                "vllm-metal: MLX-managed KV cache (per-request mlx-lm caches; vLLM accounts "
                "%d blocks x %d tokens; prefix snapshots up to %.1f MiB)",
                kv_cache_config.num_blocks, self.block_size, self._prefix_bytes() / 2**20,
            )
            return
        logger.info(
            "vllm-metal: paged KV cache of %d blocks x %d tokens (%.1f MiB); attention calls hold "
            "up to %.0f MiB each",
            self.kv.num_blocks, self.block_size, self.kv.nbytes() / 2**20,
            self.attention_limits.budget / 2**20,
        )

    def _prefix_bytes(self) -> int:
        if not self.cache_config.enable_prefix_caching:
            return 0
        return int(self.envs.prefix_cache_fraction * device_memory_bytes())

    def _new_caches(self) -> None:
        """(Re)create the KV cache: empty paged pools, or no MLX-managed caches."""
        if not self.paged:
            self.mlx_caches = MlxManagedCaches(self.loaded, self._prefix_bytes(), self.block_size, self.evaluate)
            return
        self.kv = PagedKVStore(self.loaded.specs, self._num_blocks, self.block_size, self.loaded.dtype,
                               self.attention_limits)

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
        """Run one step (``lens`` tokens of each sequence from ``starts``) on scratch K/V and return
        the MLX memory it held at its peak beyond what was allocated before and the scratch K/V.
        The MLX-managed path runs one request of all those tokens (one forward per request)."""
        mx.eval(mx.zeros(1))  # settle anything pending before the baseline
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        if not self.paged:
            n = max(1, min(sum(lens), self.max_model_len))
            scratch = MlxManagedCaches(self.loaded, 0, self.block_size)
            mx.eval(scratch.forward([RequestWork("profile", [0] * n, 0, n, False)], {"profile": n}))
            return max(0, mx.get_peak_memory() - base)
        scratch_bytes = self._scratch_forward(lens, starts)
        return max(0, mx.get_peak_memory() - base - scratch_bytes)

    def warm_up(self, num_tokens: int) -> None:
        """Run what serving runs before the first request does: a single-sequence prefill (the
        mask-free path) and, on the paged path, a step of two sequences, a prefill chunk and a decode
        (the masked block-table path). MLX's CUDA backend compiles kernels on first use; without this
        the first concurrent requests would wait for that compilation."""
        num_tokens = max(1, min(num_tokens, self.max_model_len))
        self.profile_step([num_tokens], [0])
        if self.paged and self.max_model_len > 3:  # the smallest such step: 2 + 1 rows
            self._scratch_forward([2, 1], [0, 2])

    def _scratch_forward(self, lens: list[int], starts: list[int]) -> int:
        """One step of ``lens`` tokens at ``starts`` through a scratch KV store (the real pool, if
        allocated yet, is untouched); returns the store's bytes. All sequences share one block
        table as long as the longest context: what they read and write does not matter here."""
        need = max(-(-(s + n) // self.block_size) for n, s in zip(lens, starts, strict=True))
        table = np.arange(1, 1 + need)  # block 0 stays unused, as in vLLM's pool
        store = PagedKVStore(self.loaded.specs, 1 + need, self.block_size, self.loaded.dtype,
                             self.attention_limits)
        saved, self.kv = self.kv, store
        try:
            meta = build_step_metadata(lens, starts, [table] * len(lens), self.block_size, store.limits)
            tokens = mx.zeros((sum(lens),), dtype=mx.int32)
            rows = mx.array(np.cumsum(lens).astype(np.int32) - 1)
            self._forward(tokens, meta, rows)  # evaluates the logits and the pools
            return store.nbytes()
        finally:
            self.kv = saved

    def _forward(self, tokens: mx.array, meta, rows: mx.array | None) -> mx.array:
        store = self.kv
        store.step = meta
        store.calls = 0
        logits = self.loaded.logits(tokens, store.layers, rows)
        self.evaluate(logits, store.arrays())
        if not self._verified:
            if store.calls != self.num_layers:
                raise UnsupportedModelError(
                    f"{type(self.loaded.model).__module__}: only {store.calls} of "
                    f"{self.num_layers} layers attended through the paged cache; this model's "
                    "attention is not supported on the paged path."
                )
            self._verified = True
        store.step = None
        return logits

    # ----------------------------------------------------------------- request state
    def _update_states(self, so) -> None:
        batch = self.input_batch
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
            self.num_prompt_logprobs.pop(req_id, None)
            self._last_update.pop(req_id, None)
            batch.remove_request(req_id)
        if so.kv_cache_block_copies and self.kv is not None:
            self.kv.copy_blocks([(c.src_block_id, c.dst_block_id) for c in so.kv_cache_block_copies])

        cached = so.scheduled_cached_reqs
        scheduled = so.num_scheduled_tokens.keys()
        for req_id in batch.req_id_to_index.keys() - (scheduled - cached.resumed_req_ids):
            batch.remove_request(req_id)

        to_add: list[CachedRequestState] = []
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            if params is None or new.prompt_token_ids is None:
                raise ValueError("vllm-metal runs generation on token ids only (no pooling, no "
                                 "prompt embeddings); both are refused at startup.")
            generator = None
            if params.sampling_type == SamplingType.RANDOM_SEED:
                generator = torch.Generator(device="cpu")
                generator.manual_seed(params.seed)
            state = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=new.prompt_token_ids,
                prompt_embeds=new.prompt_embeds,
                mm_features=new.mm_features,
                sampling_params=params,
                generator=generator,
                block_ids=new.block_ids,
                num_computed_tokens=new.num_computed_tokens,
                output_token_ids=[],
                lora_request=new.lora_request,
            )
            self.requests[new.req_id] = state
            if params.prompt_logprobs is not None:
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
            self._last_update[req_id] = (  # formatted only if the history disagrees
                req_id in cached.resumed_req_ids, index is not None,
                len(cached.all_token_ids.get(req_id, ())) or None, num_output, len(state.output_token_ids),
            )
            if req_id in cached.all_token_ids and num_output > 0:
                state.output_token_ids[:] = cached.all_token_ids[req_id][-num_output:]
            elif num_output < len(state.output_token_ids):
                del state.output_token_ids[num_output:]
                if index is not None:
                    batch.num_tokens_no_spec[index] = batch.num_prompt_tokens[index] + num_output
            if req_id in cached.resumed_req_ids:
                state.block_ids = new_blocks
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
        if self.mlx_caches is not None:  # preempted and finished requests free their caches
            self.mlx_caches.keep_only(set(batch.req_ids))

    # ----------------------------------------------------------------- one step
    def execute_model(self, so) -> ModelRunnerOutput | None:
        try:
            return self._execute(so)
        except Exception as exc:  # noqa: BLE001 - any failure of the step, MLX's above all
            if not self.survives_failed_steps:
                raise
            self._pending = self._fail_step(so, exc)
            return None

    def _execute(self, so) -> ModelRunnerOutput | None:
        t0 = time.perf_counter()
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        batch = self.input_batch
        num_reqs = batch.num_reqs
        table = batch.block_table[0]
        lens, starts, tables, token_parts, partial = [], [], [], [], []
        for i, req_id in enumerate(batch.req_ids):
            n = so.num_scheduled_tokens[req_id]
            start = int(batch.num_computed_tokens_cpu[i])
            if start + n > batch.num_tokens_no_spec[i]:
                state = self.requests[req_id]
                raise RuntimeError(
                    f"vllm-metal: request {req_id} is scheduled for positions {start}..{start + n - 1} "
                    f"but the runner holds {int(batch.num_tokens_no_spec[i])} tokens "
                    f"({len(state.prompt_token_ids or [])} prompt + {len(state.output_token_ids)} "
                    f"output); the runner's token history and the scheduler's disagree (last update: "
                    f"{_describe_update(self._last_update.get(req_id))})."
                )
            lens.append(n)
            starts.append(start)
            tables.append(table.block_table.np[i, : table.num_blocks_per_row[i]])
            token_parts.append(batch.token_ids_cpu[i, start : start + n])
            partial.append(start + n < batch.num_tokens_no_spec[i])
        cu = np.cumsum([0] + lens)
        rows = list(cu[1:] - 1)
        prompt_rows: dict[str, tuple[int, int, int]] = {}
        for req_id in self.num_prompt_logprobs:
            i = batch.req_id_to_index.get(req_id)
            if i is None:
                continue
            prompt_rows[req_id] = (len(rows), lens[i], starts[i])
            rows.extend(range(cu[i], cu[i + 1]))

        moved = 0
        if self.mlx_caches is not None:
            logits = self._forward_mlx_managed(lens, starts, prompt_rows)
        else:
            before = self.kv.moved_blocks
            tables = self.kv.physical_tables(tables, [s + n for s, n in zip(starts, lens, strict=True)])
            moved = self.kv.moved_blocks - before  # placement happens only here
            meta = build_step_metadata(lens, starts, tables, self.block_size, self.kv.limits)
            tokens = mx.array(np.concatenate(token_parts).astype(np.int32))
            decode_only = not prompt_rows and lens.count(1) == len(lens)  # every row's logits, in order
            logits = self._forward(tokens, meta, None if decode_only else mx.array(np.asarray(rows, dtype=np.int32)))
        self._pending = _PendingStep(so, logits, num_reqs, partial, prompt_rows, int(cu[-1]),
                                     lens.count(1), t0, time.perf_counter() - t0,
                                     self.evaluate.launch_s, self.evaluate.wait_s, moved)
        return None

    def _forward_mlx_managed(self, lens, starts, prompt_rows) -> mx.array:
        """The MLX-managed path: one (1, n) forward per request, prompt rows after the last rows
        in the same order as the paged path lays them out."""
        batch = self.input_batch
        works = []
        for i, req_id in enumerate(batch.req_ids):
            end = int(batch.num_tokens_no_spec[i])
            works.append(RequestWork(req_id, batch.token_ids_cpu[i, :end].tolist(), starts[i], lens[i],
                                     req_id in prompt_rows))
        order = [w.req_id for w in works if w.all_rows]
        row = len(works)
        for req_id in order:  # forward() appends all-rows blocks in batch order
            _, count, start = prompt_rows[req_id]
            prompt_rows[req_id] = (row, count, start)
            row += count
        prompt_lens = {r: int(batch.num_prompt_tokens[i]) for i, r in enumerate(batch.req_ids)}
        return self.mlx_caches.forward(works, prompt_lens)

    def sample_tokens(self, grammar_output) -> ModelRunnerOutput:
        pending, self._pending = self._pending, None
        if pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        if isinstance(pending, FailedStep):
            return pending
        try:
            return self._sample(pending, grammar_output)
        except Exception as exc:  # noqa: BLE001 - as in execute_model
            if not self.survives_failed_steps:
                raise
            return self._fail_step(pending.scheduler_output, exc)

    def _fail_step(self, so, exc: Exception) -> FailedStep:
        """A step failed (an MLX evaluation out of device memory, say): log it with the knobs that
        bound a step's memory, clear the K/V cache (a failed evaluation leaves the pools it was
        updating unusable) and the runner's batch, and answer with a ``FailedStep`` naming the
        step's requests. The scheduler (``vllm_metal.scheduler``) finishes those with an error and
        recomputes the other running requests."""
        req_ids = list(so.num_scheduled_tokens)
        logger.error(
            "vllm-metal: a step of %d request(s), %d token(s) failed: %s: %s. Its requests finish with "
            "an error, the KV cache is cleared, and the engine keeps serving. If this is out of memory: "
            "lower --max-num-batched-tokens or --max-num-seqs, lower VLLM_METAL_ATTENTION_MB, or leave "
            "more memory free (--kv-cache-memory-bytes, VLLM_METAL_MEMORY_FRACTION).\n%s",
            len(req_ids), so.total_num_scheduled_tokens, type(exc).__name__, exc,
            "".join(traceback.format_exception(exc)),
        )
        error = f"{type(exc).__name__}: {exc}"
        exc.__traceback__ = None  # its frames hold the failed step's arrays
        del exc
        if self.loaded.row_select is not None:
            self.loaded.row_select.rows = None
        batch = self.input_batch
        for req_id in list(batch.req_ids):
            batch.remove_request(req_id)
        batch.condense()
        batch.refresh_metadata()
        self.kv = self.mlx_caches = None
        gc.collect()
        mx.clear_cache()
        self._new_caches()
        return FailedStep(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                          error=error)

    def _sample(self, pending: _PendingStep, grammar_output) -> ModelRunnerOutput:
        entered = time.perf_counter()
        batch = self.input_batch
        n = pending.num_reqs
        logits = mlx_to_torch(pending.logits.astype(mx.float32))
        sample_logits = logits[:n].clone()
        if grammar_output is not None:
            from vllm.v1.structured_output.utils import apply_grammar_bitmask

            apply_grammar_bitmask(pending.scheduler_output, grammar_output, batch, sample_logits)

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
            token = sampled[i]
            sampled_lists.append([token])
            end = int(batch.num_tokens_no_spec[i])
            if end < self.max_model_len:
                batch.token_ids_cpu[i, end] = token
                batch.is_token_ids[i, end] = True
            batch.num_tokens_no_spec[i] = end + 1
            self.requests[req_id].output_token_ids.append(token)

        output = ModelRunnerOutput(
            req_ids=list(batch.req_ids),
            req_id_to_index=dict(batch.req_id_to_index),
            sampled_token_ids=sampled_lists,
            logprobs=out.logprobs_tensors.tolists() if out.logprobs_tensors is not None else None,
            prompt_logprobs_dict=self._prompt_logprobs(logits, pending.prompt_rows),
        )
        if self.debug:
            self._log_step(pending, entered)
        return output

    def _log_step(self, pending: _PendingStep, sample_entered: float) -> None:
        """VLLM_METAL_DEBUG: one line per step, its host time split where the engine calls us:
        ``forward`` (execute_model; of it, ``launch``: encoding and submitting the kernels, and
        ``wait``: for the device; the rest is state, metadata and recording the graph), ``between``
        (until sample_tokens is called), ``sample``, and ``outside`` (from the previous step's
        sample to this execute_model: the engine's scheduling and output handling)."""
        now = time.perf_counter()
        outside = (pending.started - self._last_step_end) * 1e3 if self._last_step_end else float("nan")
        self._last_step_end = now
        restored = self.mlx_caches.restored_tokens if self.mlx_caches is not None else 0
        kv_bytes = (self.kv or self.mlx_caches).nbytes()
        peak = mx.get_peak_memory() - self.loaded.weight_bytes - kv_bytes  # since the last step line
        mx.reset_peak_memory()
        logger.info(
            "vllm-metal step: %d reqs, %d tokens (%d decode), forward %.2f ms (launch %.2f ms, "
            "wait %.2f ms), between %.2f ms, sample %.2f ms, outside %.2f ms, KV %.1f MiB, prefix "
            "tokens restored from snapshots so far %d, blocks moved %d, MLX peak above weights and "
            "KV %.1f MiB",
            pending.num_reqs, pending.num_tokens, pending.num_decode, pending.forward_s * 1e3,
            pending.launch_s * 1e3, pending.wait_s * 1e3,
            (sample_entered - pending.started - pending.forward_s) * 1e3,
            (now - sample_entered) * 1e3, outside, kv_bytes / 2**20, restored, pending.moved_blocks,
            peak / 2**20,
        )

    def _prompt_logprobs(self, logits: torch.Tensor, prompt_rows) -> dict[str, LogprobsTensors | None]:
        """Logprobs of each prompt token given its prefix, gathered chunk by chunk."""
        result: dict[str, LogprobsTensors | None] = {}
        for req_id, (row0, count, start) in prompt_rows.items():
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


def _describe_update(facts: tuple | None) -> str:
    if facts is None:
        return "none"
    names = ("resumed", "in_batch", "all_token_ids", "num_output", "held_output")
    return " ".join(f"{n}={v}" for n, v in zip(names, facts, strict=True))
