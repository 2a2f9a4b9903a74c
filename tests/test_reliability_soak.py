"""Heavy: a 1,000-request soak and 1,000 sampled completions, on a tiny random-weight llama.

Both check the plugin's mechanics (scheduling, KV blocks, memory, sampling), not the model: a
2-layer llama with SmolLM2's real tokenizer and vocabulary (reliability.tiny) runs them in
minutes where the 135M model would take an hour on a CPU. The sampling test compares the
empirical first-token distribution over 1,000 seeds with HF transformers' softmax on the same
weights (chi-square, alpha = 0.001).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from statistics import NormalDist

import httpx
import pytest
from conftest import VllmServer
from references import tokenizer
from reliability.http import AUTH, TINY_NAME, metrics, post, stream_completion, wait_engine_idle
from reliability.procs import tree_rss
from reliability.tiny import first_token_probs

pytestmark = pytest.mark.heavy
pytest_plugins = ("reliability.fixtures",)

N_SOAK = 1000
RSS_GROWTH_LIMIT = 0.05
TEMPERATURE = 0.8
ALPHA_Z = NormalDist().inv_cdf(1 - 0.001)


def _soak_jobs(tok) -> list[dict]:
    """1,000 requests: completions/chat, short/long prompts, streaming or not, greedy or sampled.
    Greedy requests repeat 8 templates so their outputs can be checked against each other."""
    rng = random.Random(1)
    base = tok("The history of computing is a story of layered abstractions. " * 60)["input_ids"]
    jobs = []
    for i in range(N_SOAK):
        greedy = rng.random() < 0.4
        template = rng.randrange(8) if greedy else i
        r = random.Random(template)
        long = r.random() < 0.2
        start = r.randrange(50)
        prompt = base[start: start + (r.randint(150, 400) if long else r.randint(4, 24))]
        job = {"i": i, "chat": r.random() < 0.3, "stream": rng.random() < 0.5, "greedy": greedy,
               "template": template if greedy else None, "prompt": prompt, "max_tokens": r.randint(1, 12),
               "seed": i}
        jobs.append(job)
    return jobs


async def _one(client: httpx.AsyncClient, srv: VllmServer, tok, job: dict) -> list[int]:
    """Send one soak request; return its generated token ids (any failure raises)."""
    sampling = {"temperature": 0} if job["greedy"] else {"temperature": TEMPERATURE, "seed": job["seed"]}
    common = {"model": TINY_NAME, "max_tokens": job["max_tokens"], "ignore_eos": True, **sampling}
    if job["chat"]:
        text = tok.decode(job["prompt"])
        body = {**common, "messages": [{"role": "user", "content": text}], "return_token_ids": True}
        r = await client.post(f"{srv.url}/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["token_ids"]
    body = {**common, "prompt": job["prompt"], "return_token_ids": True}
    if job["stream"]:
        tokens, finish = await stream_completion(client, f"{srv.url}/completions", body)
        assert finish == "length", finish
        return tokens
    r = await client.post(f"{srv.url}/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


async def _run(srv: VllmServer, tok, jobs: list[dict], concurrency: int = 24) -> list[list[int]]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, headers=AUTH,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def guarded(job):
            async with sem:
                return await _one(client, srv, tok, job)

        return await asyncio.gather(*(guarded(j) for j in jobs))


def test_soak_1000_mixed_requests(tiny_server, models):
    tok = tokenizer(models.hf)
    jobs = _soak_jobs(tok)
    pid = tiny_server.proc.pid
    preempted = metrics(tiny_server.base, AUTH).get("vllm:num_preemptions_total", 0.0)
    first = asyncio.run(_run(tiny_server, tok, jobs[:200]))
    rss_200 = tree_rss(pid)
    rest = asyncio.run(_run(tiny_server, tok, jobs[200:]))
    rss_1000 = tree_rss(pid)
    outputs = first + rest
    m = wait_engine_idle(tiny_server.base, AUTH, timeout=120)
    growth = (rss_1000 - rss_200) / rss_200
    print(f"soak: {len(outputs)} requests, 0 failures; tree RSS {rss_200 / 2**20:.0f} MiB at 200 -> "
          f"{rss_1000 / 2**20:.0f} MiB at 1000 ({100 * growth:+.2f}%); KV usage after "
          f"{m.get('vllm:kv_cache_usage_perc')}; preemptions "
          f"{m.get('vllm:num_preemptions_total', 0.0) - preempted:.0f}")
    vocab = len(tok)
    greedy_seen: dict[int, list[int]] = {}
    for job, out in zip(jobs, outputs, strict=True):
        assert len(out) == job["max_tokens"], job
        assert all(0 <= t < vocab for t in out), job
        if job["greedy"]:
            key = (job["template"], job["chat"])
            assert greedy_seen.setdefault(key, out) == out, f"greedy template {key} changed"
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {100 * growth:.2f}% between request 200 and 1000"
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0


def _chi2_critical(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - alpha."""
    return df * (1 - 2 / (9 * df) + ALPHA_Z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: Counter, probs, n: int) -> tuple[float, int]:
    """Pearson statistic over tokens expected >= 5 times each, plus one bin for all the rest."""
    bins = [t for t in range(len(probs)) if probs[t] * n >= 5]
    observed = [counts.get(t, 0) for t in bins]
    expected = [float(probs[t]) * n for t in bins]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True)), len(bins)


def test_1000_sampled_completions_are_sane_and_follow_softmax(tiny_server, tiny_model, models):
    tok = tokenizer(models.hf)
    prompt = tok("Once upon a time")["input_ids"]

    def batch(j: int) -> dict:
        r = post(tiny_server, "/completions", {
            "model": TINY_NAME, "prompt": prompt, "max_tokens": 4, "temperature": TEMPERATURE,
            "n": 10, "seed": 10 * j, "logprobs": 1, "ignore_eos": True, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(batch, range(100)))  # seeds 0..999 (child k of seed s gets s + k)
    choices = [c for r in responses for c in r["choices"]]
    assert len(choices) == 1000
    vocab = len(tok)
    for c in choices:
        assert len(c["token_ids"]) == 4 and all(0 <= t < vocab for t in c["token_ids"]), c["token_ids"]
        lp = c["logprobs"]
        assert all(math.isfinite(v) and v <= 0 for v in lp["token_logprobs"]), lp["token_logprobs"]
        assert all(math.isfinite(v) for top in lp["top_logprobs"] for v in top.values())
    counts = Counter(c["token_ids"][0] for c in choices)

    probs = first_token_probs(tiny_model, prompt, TEMPERATURE)
    stat, bins = _chi2(counts, probs, len(choices))
    critical = _chi2_critical(bins)
    wrong, _ = _chi2(counts, first_token_probs(tiny_model, prompt, 1.0), len(choices))
    print(f"sampling: 1000 completions, {len(counts)} distinct first tokens, chi2 {stat:.1f} over "
          f"{bins + 1} bins (critical {critical:.1f} at alpha 0.001); vs T=1.0: {wrong:.1f}")
    assert bins >= 8, "the model's distribution is too peaked for a meaningful test"
    assert stat < critical, (stat, critical, counts.most_common(10))
    assert wrong > critical, "the test cannot tell temperature 0.8 from 1.0: it has no power"
