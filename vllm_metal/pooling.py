"""Embeddings for ``--runner pooling``: vLLM's own pooler over the MLX model's final hidden states.

vLLM turns a causal LM into an embedding model (``--convert embed``, its default for a
``*ForCausalLM`` under ``--runner pooling``) by pooling the final normed hidden states: the last
token's, the mean, or every token's, normalised or not, with Matryoshka ``dimensions``, as its
``PoolerConfig`` and each request's ``PoolingParams`` say. The runner computes those hidden states
in MLX (``LoadedModel.without_head``) for every scheduled position; this class hands them to
vLLM's ``DispatchPooler`` with vLLM's own pooling metadata, so chunked prompts are pooled exactly
as vLLM pools them (a request's output comes with the step that completes its prompt).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from vllm.config import ModelConfig
from vllm.model_executor.layers.pooler import DispatchPooler
from vllm.pooling_params import PoolingParams
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.gpu_input_batch import InputBatch

from vllm_metal.bridge import mlx_to_torch


class Pooling:
    def __init__(self, model_config: ModelConfig):
        self.pooler = DispatchPooler.for_embedding(model_config.pooler_config)

    def supported_tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self.pooler.get_supported_tasks()))

    def prepare(self, params: PoolingParams) -> None:
        """What the task's pooler needs set on a new request's params (as vLLM's runners do)."""
        if params.task is None:
            raise ValueError("a pooling request without a task")
        self.pooler.get_pooling_updates(params.task).apply(params)

    def output(self, batch: InputBatch, lens: list[int], starts: list[int], hidden: mx.array) -> ModelRunnerOutput:
        """The step's pooled outputs from ``hidden``: the final hidden states of every scheduled
        position, in batch order. Requests whose prompt is not complete yet get None."""
        states = mlx_to_torch(hidden)
        metadata = batch.get_pooling_metadata()
        seq_lens = torch.tensor([s + n for s, n in zip(starts, lens, strict=True)], dtype=torch.int32)
        metadata.build_pooling_cursor(np.asarray(lens, dtype=np.int32), seq_lens, device=states.device)
        pooled = self.pooler(hidden_states=states, pooling_metadata=metadata)
        finished = metadata.get_pooling_cursor().get_finished_mask()
        rows = list(pooled) if pooled is not None else [None] * len(lens)
        output = ModelRunnerOutput(req_ids=list(batch.req_ids), req_id_to_index=dict(batch.req_id_to_index))
        # copies: ``states`` may share memory with MLX buffers that the next step reuses
        output.pooler_output = [row.clone() if done and row is not None else None
                                for row, done in zip(rows, finished, strict=True)]
        return output
