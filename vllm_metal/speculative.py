"""Speculative decoding with n-gram (prompt lookup) drafts: ``--speculative-config '{"method": "ngram", ...}'``.

vLLM's ``NgramProposer`` drafts up to ``num_speculative_tokens`` tokens per request from the
request's own history (the longest earlier n-gram matching its end, and what followed it), and
vLLM's scheduler schedules them after the request's next token. The runner computes logits at
every scheduled position of such a request in its one packed forward, and this class verifies the
drafts against them: a greedy request keeps the longest prefix of drafts that equals the model's
argmax at each position, then the argmax after it, which is exactly the tokens plain greedy
decoding would have produced (several per step). The KV written for rejected drafts is overwritten
later: vLLM counts only the accepted tokens as computed.

Drafts are proposed only for requests whose next tokens are verified exactly this way: greedy
requests whose sampling needs nothing of vLLM's host sampler (``sampling.host_reason``) and no
logit bias. Others (random sampling, penalties, logprobs, structured output...) get no drafts and
are sampled one token per step as without speculation, so their distribution is unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.outputs import DraftTokenIds
from vllm.v1.worker.gpu_input_batch import InputBatch

from vllm_metal.sampling import SAMPLING_EPS, host_reason


def verifiable(params: SamplingParams | None) -> bool:
    """Drafts for this request would be verified exactly (greedy, nothing the host sampler adds)."""
    return (params is not None and params.temperature < SAMPLING_EPS and host_reason(params) is None
            and not params.logit_bias)


def accept(drafts: list[int], targets: list[int]) -> list[int]:
    """The tokens greedy decoding emits: drafts while each equals the model's argmax at its
    position (``targets[j]``), then the argmax where they first differ (or after the last)."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return drafts[:n] + [targets[n]]


class NgramSpeculation:
    def __init__(self, vllm_config: VllmConfig):
        from vllm.v1.spec_decode.ngram_proposer import NgramProposer

        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.proposer = NgramProposer(vllm_config)
        self._drafts: DraftTokenIds | None = None

    def verify(self, logits: torch.Tensor, drafts: list[int]) -> list[int]:
        """Tokens of a greedy request from its ``len(drafts) + 1`` rows of logits."""
        return accept(drafts, logits.argmax(dim=-1).tolist())

    def propose(self, batch: InputBatch, sampled: list[list[int]], params: list[SamplingParams | None]) -> None:
        """Drafts for the next step, from each request's history including this step's tokens
        (``batch`` already holds them); none for requests that got no token or are not verifiable."""
        wanted = [s if verifiable(p) else [] for s, p in zip(sampled, params, strict=True)]
        drafts = self.proposer.propose(self.k, wanted, batch.num_tokens_no_spec, batch.token_ids_cpu)
        self._drafts = DraftTokenIds(list(batch.req_ids), [list(map(int, d)) for d in drafts])

    def take(self) -> DraftTokenIds | None:
        drafts, self._drafts = self._drafts, None
        return drafts


def scheduled_drafts(batch: InputBatch) -> list[list[int]]:
    """Each batch row's drafts scheduled this step (``InputBatch.update_req_spec_token_ids``)."""
    return [list(batch.spec_token_ids[i]) for i in range(batch.num_reqs)]


def first_rows(counts: list[int]) -> np.ndarray:
    """First row of each request in logits laid out request by request with ``counts`` rows each."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
