"""A small OpenAI-compatible load generator (httpx, asyncio), and the protocol's timed request.

This client is the concurrency sweep's default load generator (``--loadgen builtin``), the same
for every system; vLLM's ``vllm bench serve`` (``--loadgen vllm-bench``, see ``sweep.py``) stays
available to cross-check the vLLM systems and measures the same way: TTFT is the time to the
first chunk carrying text, TPOT is ``(latency - TTFT) / (tokens - 1)``, output throughput is all
completion tokens over the wall clock of the whole run. Completion tokens come from the stream's
usage chunk (``stream_options.include_usage``); servers that send none (llama.cpp's Python server)
are counted by re-tokenizing the text with the model's tokenizer, as ``vllm bench serve`` does.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.prompts import chat_body

TIMEOUT = httpx.Timeout(3600.0, connect=30.0)


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from its own start."""

    ok: bool
    latency: float = 0.0
    ttft: float = 0.0
    completion_tokens: int = 0
    counted_by: str = "usage"  # or "tokenizer" when the server sent no usage
    error: str = ""
    chunk_times: list[float] = field(default_factory=list)


def timed_chat(base_url: str, body: dict[str, Any], timeout: float = 3600.0) -> tuple[int, float]:
    """(completion_tokens, wall seconds) of one non-streamed chat completion; raises on failure."""
    t0 = time.perf_counter()
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
    return int(r.json()["usage"]["completion_tokens"]), wall


async def stream_chat(client: httpx.AsyncClient, base_url: str, body: dict[str, Any],
                      count_tokens: Callable[[str], int]) -> RequestResult:
    """Send one streamed chat completion and time each chunk that carries text."""
    t0 = time.perf_counter()
    text, usage = [], None
    res = RequestResult(ok=False)
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue  # blank lines, SSE comments (mlx_lm.server keep-alives)
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        res.chunk_times.append(time.perf_counter() - t0)
                        text.append(delta)
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - t0
    if not res.chunk_times:
        res.error = "no text chunk received"
        return res
    res.ttft = res.chunk_times[0]
    if usage and usage.get("completion_tokens"):
        res.completion_tokens = int(usage["completion_tokens"])
    else:
        res.completion_tokens, res.counted_by = count_tokens("".join(text)), "tokenizer"
    res.ok = True
    return res


async def run_clients(base_url: str, model: str, prompts: list[str], max_tokens: int,
                      concurrency: int, bias: dict[str, float],
                      count_tokens: Callable[[str], int]) -> tuple[list[RequestResult], float]:
    """``concurrency`` clients work through ``prompts`` in order; returns results and wall time."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            body = chat_body(model, prompt, max_tokens, bias, stream=True)
            results.append(await stream_chat(client, base_url, body, count_tokens))

    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without needing numpy."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[RequestResult], wall: float) -> dict[str, Any]:
    """The sweep's metrics, named as ``vllm bench serve`` names them."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft * 1000 for r in ok]
    tpots = [(r.latency - r.ttft) * 1000 / (r.completion_tokens - 1)
             for r in ok if r.completion_tokens > 1]
    total = sum(r.completion_tokens for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": wall,
        "total_output_tokens": total, "output_throughput": total / wall if wall > 0 else math.nan,
        "mean_ttft_ms": sum(ttfts) / len(ttfts) if ttfts else math.nan,
        "p99_ttft_ms": percentile(ttfts, 99),
        "mean_tpot_ms": sum(tpots) / len(tpots) if tpots else math.nan,
        "tokens_counted_by": sorted({r.counted_by for r in ok}),
        "errors": [r.error for r in results if not r.ok][:5],
    }
