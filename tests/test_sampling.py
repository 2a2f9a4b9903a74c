"""The device sampler (``vllm_metal.sampling``) against vLLM's own sampling.

Greedy rows must pick vLLM's ``Sampler`` tokens; random rows must draw from the distribution vLLM
defines (logit bias, temperature, then min-p, then vLLM's own top-k/top-p masking, ``apply_top_k_top_p_pytorch``),
checked by a chi-square test that must also tell it from the unfiltered distribution. Which
requests the device sampler leaves to vLLM's ``Sampler`` is ``host_reason``'s answer.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from vllm.sampling_params import SamplingParams, StructuredOutputsParams
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

from vllm_metal.sampling import HOST_FIELDS, RowParams, host_reason, sample

VOCAB = 24
DRAWS = 40_000
ALPHA_Z = 3.090  # standard normal quantile at 1 - 0.001


def _logits(seed: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2.0, size=(rows, VOCAB)).astype(np.float32)


def vllm_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """vLLM's sampling distribution for one row: logit bias, temperature, min-p, then its top-k/top-p."""
    biased = logits.astype(np.float64)
    for token, value in (p.logit_bias or {}).items():
        biased[token] += value
    scaled = torch.tensor(biased[None]) / p.temperature
    if p.min_p > 0:
        probs = scaled.softmax(-1)
        scaled = scaled.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, -math.inf)
    k = torch.tensor([p.top_k]) if p.top_k > 0 else None
    top_p = torch.tensor([p.top_p], dtype=torch.float64) if p.top_p < 1 else None
    return apply_top_k_top_p_pytorch(scaled, k, top_p).softmax(-1)[0].numpy()


def _chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Pearson statistic over tokens expected >= 5 times (the rest pooled) and its critical value
    at alpha 0.001 (Wilson-Hilferty). A token outside the support counts fully against."""
    n = counts.sum()
    expected = probs * n
    bins = expected >= 5
    obs = np.append(counts[bins], counts[~bins].sum())
    exp = np.append(expected[bins], max(expected[~bins].sum(), 1e-9))
    df = int(bins.sum())
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, df * (1 - 2 / (9 * df) + ALPHA_Z * math.sqrt(2 / (9 * df))) ** 3


CASES = {
    "temperature": SamplingParams(temperature=0.8),
    "top_k": SamplingParams(temperature=1.0, top_k=4),
    "top_p": SamplingParams(temperature=1.3, top_p=0.7),
    "min_p": SamplingParams(temperature=0.9, min_p=0.1),
    "all": SamplingParams(temperature=1.1, top_k=8, top_p=0.85, min_p=0.02),
    "logit_bias": SamplingParams(temperature=1.0, top_p=0.9, logit_bias={0: 3.0, 7: -100.0, 11: 1.5}),
}


@pytest.mark.parametrize("name", CASES)
def test_random_rows_follow_vllms_distribution(name):
    params = CASES[name]
    row = _logits(1)[0]
    mx.random.seed(0)
    tokens = np.array(sample(mx.array(np.repeat(row[None], DRAWS, axis=0)), RowParams.of([params] * DRAWS)))
    counts = np.bincount(tokens, minlength=VOCAB)
    want = vllm_probs(row, params)
    stat, critical = _chi2(counts, want)
    assert stat < critical, (name, stat, critical)
    assert counts[want == 0].sum() == 0, "drew a token vLLM masks out"
    unfiltered = vllm_probs(row, SamplingParams(temperature=1.0))
    wrong, _ = _chi2(counts, unfiltered)
    assert wrong > critical, "the test cannot tell this case from plain softmax sampling"


def test_greedy_rows_pick_vllms_tokens_in_a_mixed_batch():
    """Greedy rows (temperature 0) beside random ones: the greedy rows are vLLM's argmax (of the
    biased logits where a row has a logit bias)."""
    from vllm.v1.sample.sampler import Sampler

    logits = _logits(2, rows=8)
    logits[3, 5] = logits[3].max()  # a tie: the lower index wins, as in torch.argmax
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=0.7, top_p=0.9)
              for i in range(8)]
    params[5] = SamplingParams(temperature=0.0, logit_bias={2: 50.0})
    params[7] = SamplingParams(temperature=0.0, logit_bias={int(logits[7].argmax()): -100.0})
    got = np.array(sample(mx.array(logits), RowParams.of(params)))
    biased = logits.copy()
    biased[5, 2] += 50.0
    biased[7, logits[7].argmax()] -= 100.0
    greedy = Sampler().greedy_sample(torch.tensor(biased)).numpy()
    assert got[5] == 2 and got[7] != logits[7].argmax()
    for i in range(1, 8, 2):
        assert got[i] == greedy[i], i


@pytest.mark.parametrize("field", HOST_FIELDS)
def test_what_the_device_sampler_leaves_to_vllm(field):
    values = {
        "seed": 1, "logprobs": 0, "prompt_logprobs": 0, "logprob_token_ids": [1],
        "prompt_logprob_token_ids": [1], "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "repetition_penalty": 1.1, "min_tokens": 2, "allowed_token_ids": [1, 2],
        "bad_words": ["x"], "structured_outputs": StructuredOutputsParams(regex="a+"), "watermarking": True,
        "thinking_token_budget": 10,
    }
    params = SamplingParams(temperature=0.7, top_p=0.9)
    assert host_reason(params) is None
    setattr(params, field, values[field])
    assert host_reason(params) == field


@pytest.mark.parametrize("field, value", [("watermarking", False), ("bad_words", []),
                                          ("allowed_token_ids", []), ("logprob_token_ids", [])])
def test_fields_resolved_to_off_stay_on_the_device(field, value):
    """vLLM's input processor fills fields in before the runner sees a request (``watermarking``
    becomes False on an engine without a watermark): "off" is not a reason to leave the device."""
    params = SamplingParams(temperature=0.7, top_p=0.9)
    setattr(params, field, value)
    assert host_reason(params) is None
