"""Speculative decoding: ``--speculative-config`` with n-gram (prompt lookup) or draft-model drafts.

Drafts of up to ``num_speculative_tokens`` tokens per request come from vLLM's ``NgramProposer``
(``"method": "ngram"``: the longest earlier n-gram of the request's own history matching its end,
and what followed it) or from a smaller mlx-lm checkpoint with the same tokenizer decoding greedily
(``"method": "draft_model"``, ``"model": PATH``), and vLLM's scheduler schedules them after the
request's next token. The runner computes logits at
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

import mlx.core as mx
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


class Speculation:
    """Drafts for the next step (``propose``, read by vLLM through ``take``) and their verification."""

    weight_bytes = 0  # of a draft model

    def __init__(self, vllm_config: VllmConfig):
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self._drafts: DraftTokenIds | None = None

    def verify(self, logits: torch.Tensor, drafts: list[int]) -> list[int]:
        """Tokens of a greedy request from its ``len(drafts) + 1`` rows of logits."""
        return accept(drafts, logits.argmax(dim=-1).tolist())

    def propose(self, batch: InputBatch, sampled: list[list[int]], params: list[SamplingParams | None]) -> None:
        raise NotImplementedError

    def take(self) -> DraftTokenIds | None:
        drafts, self._drafts = self._drafts, None
        return drafts


def speculation_for(vllm_config: VllmConfig) -> Speculation | None:
    method = None if vllm_config.speculative_config is None else vllm_config.speculative_config.method
    if method is None:
        return None
    return NgramSpeculation(vllm_config) if method == "ngram" else DraftModelSpeculation(vllm_config)


class NgramSpeculation(Speculation):
    def __init__(self, vllm_config: VllmConfig):
        from vllm.v1.spec_decode.ngram_proposer import NgramProposer

        super().__init__(vllm_config)
        self.proposer = NgramProposer(vllm_config)

    def propose(self, batch: InputBatch, sampled: list[list[int]], params: list[SamplingParams | None]) -> None:
        """Drafts for the next step, from each request's history including this step's tokens
        (``batch`` already holds them); none for requests that got no token or are not verifiable."""
        wanted = [s if verifiable(p) else [] for s, p in zip(sampled, params, strict=True)]
        drafts = self.proposer.propose(self.k, wanted, batch.num_tokens_no_spec, batch.token_ids_cpu)
        self._drafts = DraftTokenIds(list(batch.req_ids), [list(map(int, d)) for d in drafts])


class DraftModelSpeculation(Speculation):
    """A small mlx-lm model drafts greedily. Each request keeps the draft model's own mlx-lm KV
    cache and the tokens it holds; before drafting, the cache is cut back to where it agrees with
    the request's history (rejected drafts go) and fed the rest."""

    def __init__(self, vllm_config: VllmConfig):
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        from vllm_metal.loader import load, resolve_model_dir

        super().__init__(vllm_config)
        draft = vllm_config.speculative_config.draft_model_config
        self.draft = load(resolve_model_dir(draft.model), vllm_config.model_config.dtype, draft.trust_remote_code)
        self.weight_bytes = self.draft.weight_bytes
        self._new_caches = lambda: make_prompt_cache(self.draft.model)
        if any(type(c) is not KVCache for c in self._new_caches()):
            raise ValueError(f"draft model {draft.model}: its layers keep caches that cannot be cut back "
                             "(sliding-window or recurrent); use a model with full attention only")
        self._state: dict[str, tuple[list, list[int]]] = {}  # req_id -> (caches, tokens they hold)

    def propose(self, batch: InputBatch, sampled: list[list[int]], params: list[SamplingParams | None]) -> None:
        for gone in self._state.keys() - set(batch.req_ids):
            del self._state[gone]
        drafts = []
        for i, req_id in enumerate(batch.req_ids):
            n = int(batch.num_tokens_no_spec[i])
            if not sampled[i] or not verifiable(params[i]) or n >= self.max_model_len:
                drafts.append([])
                continue
            drafts.append(self._draft(req_id, batch.token_ids_cpu[i, :n].tolist()))
        self._drafts = DraftTokenIds(list(batch.req_ids), drafts)

    def _draft(self, req_id: str, history: list[int]) -> list[int]:
        caches, held = self._state.get(req_id) or (self._new_caches(), [])
        agree = 0
        for a, b in zip(held, history[:-1], strict=False):  # the last token is always fed: its logits draft
            if a != b:
                break
            agree += 1
        if len(held) > agree:
            for cache in caches:
                cache.trim(len(held) - agree)
        held = held[:agree]
        feed, out = history[agree:], []
        for _ in range(self.k):
            logits = self.draft.logits(mx.array(feed, dtype=mx.int32)[None], caches, mx.array([len(feed) - 1]))
            out.append(int(mx.argmax(logits[-1]).item()))
            held += feed
            feed = out[-1:]
        self._state[req_id] = (caches, held)
        return out


def scheduled_drafts(batch: InputBatch) -> list[list[int]]:
    """Each batch row's drafts scheduled this step (``InputBatch.update_req_spec_token_ids``)."""
    return [list(batch.spec_token_ids[i]) for i in range(batch.num_reqs)]


def first_rows(counts: list[int]) -> np.ndarray:
    """First row of each request in logits laid out request by request with ``counts`` rows each."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
