"""The vLLM model classes vLLM inspects for architectures whose own module cannot be imported
here (``patches.vllm.qwen3_5_text_classes``). vLLM reads their interfaces only; they are never
built: the model is mlx-lm's."""

from __future__ import annotations

from vllm.model_executor.models.qwen3_next import Qwen3NextForCausalLM


class Qwen3_5ForCausalLM(Qwen3NextForCausalLM):
    """Qwen3.5 text-only: hybrid Gated DeltaNet + attention, Qwen3-Next's interfaces."""


class Qwen3_5MoeForCausalLM(Qwen3NextForCausalLM):
    """Qwen3.5 MoE text-only: Qwen3-Next's interfaces (hybrid, MoE)."""
