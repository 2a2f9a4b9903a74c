"""Overload and client disconnects.

Overload, on real weights with the KV budget squeezed to 24 blocks: 64 concurrent streaming
requests (16 distinct prompts, 4 copies each) need ~100 blocks, so the scheduler must preempt;
every greedy stream must still equal the same request sent alone. Prompts are short (6-13
tokens): on MLX's CPU backend every token of the 135M model costs ~50 ms whether prefilled or
decoded, and 16-token block boundaries are crossed all the same.

Disconnects: 200 streams cut off by the client at random points (right after the headers,
mid-stream, while still waiting for a slot); afterwards no request may be running or waiting,
every KV block must be free (/metrics) and a normal request must answer as before. They run on
the tiny random llama (reliability.fixtures, 256 KV blocks): aborts and block accounting do not
depend on the model, and the real one would spend minutes just prefilling 200 prompts.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from conftest import VllmServer, completion_tokens
from references import LONG_TEXT, tokenizer
from reliability.http import AUTH, TINY_NAME, post, stream_completion, wait_engine_idle

pytest_plugins = ("reliability.fixtures",)

BLOCK_BYTES = 30 * 2 * 3 * 64 * 4 * 16  # SmolLM2 fp32: layers x (K,V) x kv_heads x head_dim x 4 B x 16
KV_BLOCKS = 24
N_DISTINCT = 16
N_CONCURRENT = 64
N_DISCONNECTS = 200
MAX_NEW = 8


@pytest.fixture(scope="module")
def squeezed64(models):
    srv = VllmServer(models.hf, ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "64",
                                 "--kv-cache-memory-bytes", str(KV_BLOCKS * BLOCK_BYTES), "--seed", "0",
                                 "--no-enable-prefix-caching"], name="reliability-squeezed")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prompts(models) -> list[list[int]]:
    """16 distinct prompts of 6-13 tokens (windows over a long text): with 8 new tokens, most
    cross a 16-token block boundary while decoding."""
    ids = tokenizer(models.hf)(LONG_TEXT)["input_ids"]
    out = [ids[5 * i: 5 * i + 6 + i % 8] for i in range(N_DISTINCT)]
    assert len({tuple(p) for p in out}) == N_DISTINCT
    return out


@pytest.fixture(scope="module")
def alone(squeezed64, prompts) -> list[list[int]]:
    """Each request sent on its own (nothing else running, so never preempted)."""
    return [completion_tokens(squeezed64, p, MAX_NEW) for p in prompts]


def _body(srv: VllmServer, prompt: list[int], max_tokens: int) -> dict:
    return {"model": srv.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}


async def _all_streams(srv: VllmServer, jobs: list[tuple[dict, int | None]], concurrency: int,
                       headers: dict[str, str] | None = None):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        async def one(body, stop_after):
            async with sem:
                return await stream_completion(client, f"{srv.url}/completions", body, stop_after)

        return await asyncio.gather(*(one(b, k) for b, k in jobs))


def test_64_concurrent_streams_under_preemption_match_sequential(squeezed64, prompts, alone):
    before = squeezed64.metrics().get("vllm:num_preemptions_total", 0.0)
    order = [i % N_DISTINCT for i in range(N_CONCURRENT)]
    jobs = [(_body(squeezed64, prompts[i], MAX_NEW), None) for i in order]
    got = asyncio.run(_all_streams(squeezed64, jobs, N_CONCURRENT))
    preemptions = squeezed64.metrics().get("vllm:num_preemptions_total", 0.0) - before
    print(f"overload: {len(got)} streams, {preemptions:.0f} preemptions")
    assert preemptions > 0, f"the {KV_BLOCKS}-block budget was meant to force preemption"
    for i, (tokens, finish) in zip(order, got, strict=True):
        assert finish == "length" and tokens == alone[i], f"prompt {i}: {tokens} != {alone[i]}"


def test_200_client_disconnects_leak_nothing(tiny_server, models):
    """48 streams at a time against 32 sequence slots, so some are cut while still waiting."""
    ids = tokenizer(models.hf)(LONG_TEXT)["input_ids"]
    rng = random.Random(0)
    body = {"model": TINY_NAME, "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    probe = {**body, "prompt": ids[:12], "max_tokens": 8}
    before = post(tiny_server, "/completions", probe).json()["choices"][0]["token_ids"]
    jobs = []
    for _ in range(N_DISCONNECTS):
        start = rng.randrange(200)
        prompt = ids[start: start + rng.randint(4, 40)]
        jobs.append(({**body, "prompt": prompt}, rng.randint(0, 12)))  # SSE events read, then hang up
    got = asyncio.run(_all_streams(tiny_server, jobs, 48, AUTH))
    unfinished = sum(finish is None for _, finish in got)
    m = wait_engine_idle(tiny_server.base, AUTH, timeout=120)
    print(f"disconnects: {N_DISCONNECTS} streams, {unfinished} cut before finishing; afterwards "
          f"running={m.get('vllm:num_requests_running')} waiting={m.get('vllm:num_requests_waiting')} "
          f"KV usage={m.get('vllm:kv_cache_usage_perc')}")
    assert unfinished >= 0.9 * N_DISCONNECTS
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0, "KV blocks still in use after every client left"
    assert post(tiny_server, "/completions", probe).json()["choices"][0]["token_ids"] == before
    assert httpx.get(f"{tiny_server.base}/health", timeout=10).status_code == 200
