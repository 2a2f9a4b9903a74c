"""Sampling in MLX, on the device, for the requests that ask only for what most traffic asks for.

Greedy, temperature, top-k, top-p, min-p and logit bias, unseeded: the sampled token ids stay an MLX array, so
the next step can take them as input without a host round trip (``model_runner.py``'s
one-step-ahead path). Everything else (seeds, penalties, bad words, min-tokens,
allowed token ids, logprobs, prompt logprobs, structured output, watermarking, thinking budgets,
custom logits processors) is vLLM's ``Sampler`` on the host; ``host_reason`` says which
requests need it.

The distribution is vLLM's: the logit bias is added to the float32 logits, temperature scales
them (greedy rows take their argmax instead), min-p then drops tokens below
``min_p`` x the most likely token's probability, top-k keeps the k largest, top-p keeps the
smallest prefix of the sorted distribution whose mass reaches ``top_p``, and one token is drawn
from the renormalised rest. A temperature below ``SAMPLING_EPS`` means greedy (the argmax of the
unscaled, biased logits, as vLLM takes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from vllm.sampling_params import SamplingParams

SAMPLING_EPS = 1e-5  # vLLM's: a temperature below it is greedy

# SamplingParams fields whose effect only vLLM's host Sampler (or its logits processors) applies.
HOST_FIELDS = (
    "seed", "logprobs", "prompt_logprobs", "logprob_token_ids", "prompt_logprob_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "allowed_token_ids", "bad_words", "structured_outputs", "watermarking", "thinking_token_budget",
)
_DEFAULTS = SamplingParams()


def host_reason(params: SamplingParams) -> str | None:
    """The first field of ``params`` the device sampler does not apply, or None."""
    for name in HOST_FIELDS:
        value, default = getattr(params, name, None), getattr(_DEFAULTS, name, None)
        # Unset: the default, or "off" where the default is None (vLLM's input processor resolves
        # ``watermarking`` to False on an engine without a watermark; an empty list asks for nothing).
        off = value is False or (isinstance(value, (list, dict, set, tuple)) and not value)
        if value != default and not (default is None and off):
            return name
    return None


@dataclass(frozen=True)
class RowParams:
    """Per-row sampling parameters of one step, as NumPy columns (built once per step)."""

    temperature: np.ndarray  # float32
    top_k: np.ndarray  # int32, 0 = off
    top_p: np.ndarray  # float32, 1 = off
    min_p: np.ndarray  # float32, 0 = off
    bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # logit bias: rows, token ids, values

    @classmethod
    def of(cls, params: list[SamplingParams]) -> RowParams:
        bias = [(row, int(t), v) for row, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
        at, ids, values = zip(*bias, strict=True) if bias else ((), (), ())
        return cls(
            temperature=np.array([p.temperature for p in params], dtype=np.float32),
            top_k=np.array([p.top_k if p.top_k > 0 else 0 for p in params], dtype=np.int32),
            top_p=np.array([p.top_p for p in params], dtype=np.float32),
            min_p=np.array([p.min_p for p in params], dtype=np.float32),
            bias=(np.array(at, np.int32), np.array(ids, np.int32), np.array(values, np.float32)) if bias else None,
        )


def sample(logits: mx.array, rows: RowParams) -> mx.array:
    """One token id per row of ``logits`` (rows, vocab), as an unevaluated int32 MLX array."""
    logits = logits.astype(mx.float32)
    if rows.bias is not None:  # vLLM validated the ids against the vocabulary
        at, ids, values = rows.bias
        logits = logits.at[mx.array(at), mx.array(ids)].add(mx.array(values))
    greedy_rows = rows.temperature < SAMPLING_EPS
    greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
    if greedy_rows.all():
        return greedy
    temperature = np.where(greedy_rows, 1.0, rows.temperature).astype(np.float32)
    scaled = logits / mx.array(temperature)[:, None]
    if (rows.min_p > 0).any():
        probs = mx.softmax(scaled, axis=-1)
        floor = mx.array(rows.min_p)[:, None] * probs.max(axis=-1, keepdims=True)
        scaled = mx.where(probs < floor, -mx.inf, scaled)
    vocab = logits.shape[-1]
    use_top_k = ((rows.top_k > 0) & (rows.top_k < vocab)).any()
    use_top_p = (rows.top_p < 1.0).any()
    if use_top_k or use_top_p:
        order = mx.argsort(-scaled, axis=-1)
        ranked = mx.take_along_axis(scaled, order, axis=-1)
        if use_top_k:
            k = np.where(rows.top_k > 0, rows.top_k, vocab).astype(np.int32)
            ranked = mx.where(mx.arange(vocab)[None, :] >= mx.array(k)[:, None], -mx.inf, ranked)
        if use_top_p:
            probs = mx.softmax(ranked, axis=-1)
            before = mx.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
            ranked = mx.where(before >= mx.array(rows.top_p)[:, None], -mx.inf, ranked)
        picked = mx.random.categorical(ranked, axis=-1)
        drawn = mx.take_along_axis(order, picked[:, None], axis=-1)[:, 0]
    else:
        drawn = mx.random.categorical(scaled, axis=-1)
    return mx.where(mx.array(greedy_rows), greedy, drawn.astype(mx.int32))
