"""``--speculative-config``: several greedy tokens per step, the same tokens.

A live ``vllm serve`` with vLLM's n-gram (prompt lookup) proposer on the bundled model: greedy
completions equal HF transformers fp32 one at a time and all at once, with drafts both accepted
and rejected (vLLM's own spec-decode counters say so); seeded random sampling gives what the
plain server gives (such requests get no drafts), and structured output keeps its schema. Then a
draft model (the bundled model's 4-bit MLX checkpoint drafting for the float32 one): the same
greedy tokens, alone and batched.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import VllmServer, completion_tokens
from references import hf_greedy, prompt_ids

N_NEW = 40
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


@pytest.fixture(scope="module")
def speculating(models):
    srv = VllmServer(models.hf, ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8",
                                 "--kv-cache-memory-bytes", str(64 * 2**20),
                                 "--speculative-config", json.dumps(NGRAM)], name="ngram")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prompts(models):
    """Code, a number sequence, a long repetitive text and a chat: drafts from little to a lot."""
    ids = prompt_ids(models.hf)
    return [ids[1], ids[4], ids[6], ids[7]]


@pytest.fixture(scope="module")
def reference(models, prompts):
    return [hf_greedy(models.hf, p, N_NEW) for p in prompts]


def _counters(srv: VllmServer) -> tuple[float, float]:
    m = srv.metrics()
    return m.get("vllm:spec_decode_num_draft_tokens_total", 0.0), m.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)


def test_greedy_with_drafts_matches_transformers(speculating, prompts, reference):
    for i, p in enumerate(prompts):
        assert completion_tokens(speculating, p, N_NEW) == reference[i], f"prompt {i}"
    drafted, accepted = _counters(speculating)
    assert 0 < accepted < drafted, (drafted, accepted)  # drafts were verified both ways


def test_concurrent_requests_with_drafts_match(speculating, prompts, reference):
    before = _counters(speculating)
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: completion_tokens(speculating, p, N_NEW), prompts))
    for i, tokens in enumerate(got):
        assert tokens == reference[i], f"prompt {i}"
    assert _counters(speculating)[1] > before[1]


def test_seeded_sampling_is_what_the_plain_server_samples(speculating, server, prompts):
    extra = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
    got = completion_tokens(speculating, prompts[1], 24, **extra)
    assert got == completion_tokens(server, prompts[1], 24, **extra)


def test_structured_output_beside_drafts(speculating, prompts, reference):
    import openai
    from test_structured import SCHEMAS, _schema_chat, _schema_violation

    client = openai.OpenAI(base_url=speculating.url, api_key="x", max_retries=0, timeout=600)
    jobs = [("free", i) for i in range(len(prompts))] + [("json", k) for k in range(2)]

    def run(job):
        kind, i = job
        if kind == "free":
            return completion_tokens(speculating, prompts[i], N_NEW)
        return _schema_chat(client, speculating, i % len(SCHEMAS), seed=i)

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    for i, tokens in enumerate(got[:len(prompts)]):
        assert tokens == reference[i], f"prompt {i}"
    for schema, choice, usage in got[len(prompts):]:
        assert _schema_violation(schema, choice, usage) is None


def test_draft_model_gives_the_same_greedy_tokens(models, prompts, reference):
    draft = {"method": "draft_model", "model": str(models.mlx_4bit), "num_speculative_tokens": 3}
    srv = VllmServer(models.hf, ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8",
                                 "--kv-cache-memory-bytes", str(64 * 2**20),
                                 "--speculative-config", json.dumps(draft)], name="draft-model")
    try:  # all prompts at once: each request drafts from its own draft-model cache in one step
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: completion_tokens(srv, p, N_NEW), prompts))
        for i, tokens in enumerate(got):
            assert tokens == reference[i], f"prompt {i}"
        drafted, accepted = _counters(srv)
        assert 0 < accepted <= drafted, (drafted, accepted)
    finally:
        srv.stop()
