"""HTTP helpers that carry an API key: metrics, SSE streams that can be cut off, idle waits."""

from __future__ import annotations

import json

import httpx
from conftest import parse_metrics

from reliability.procs import wait_for

API_KEY = "reliability-secret"  # the tiny server's --api-key (reliability.fixtures)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TINY_NAME = "team/tiny"  # its --served-model-name


def post(srv, path: str, body: dict, timeout: float = 300) -> httpx.Response:
    """POST to the server's ``/v1{path}`` with the API key."""
    return httpx.post(f"{srv.url}{path}", json=body, headers=AUTH, timeout=timeout)


def metrics(base: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    r = httpx.get(f"{base}/metrics", headers=headers, timeout=30)
    r.raise_for_status()
    return parse_metrics(r.text)


def engine_idle(m: dict[str, float]) -> bool:
    """No request running or waiting and no KV block in use."""
    return (m.get("vllm:num_requests_running", 0.0) == 0 and m.get("vllm:num_requests_waiting", 0.0) == 0
            and m.get("vllm:kv_cache_usage_perc", 0.0) == 0)


def wait_engine_idle(base: str, headers: dict[str, str] | None = None, timeout: float = 120) -> dict:
    """Poll /metrics until the engine is idle; return the last sample either way."""
    last: dict[str, dict] = {}

    def idle() -> bool:
        last["m"] = metrics(base, headers)
        return engine_idle(last["m"])

    wait_for(idle, timeout, interval=1.0)
    return last["m"]


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict,
                            stop_after: int | None = None) -> tuple[list[int], str | None]:
    """POST a streaming completion; collect generated token ids (needs ``return_token_ids``).

    With ``stop_after=k`` the client hangs up after k SSE events (k=0: right after the response
    headers) by leaving the ``stream`` context, which closes the connection mid-stream.
    Returns (token ids, finish_reason).
    """
    tokens: list[int] = []
    finish = None
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            raise AssertionError(f"{r.status_code}: {r.text}")
        events = 0
        async for line in r.aiter_lines():
            if stop_after is not None and events >= stop_after:
                break
            if not line.startswith("data: "):
                continue
            events += 1
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            for choice in json.loads(payload)["choices"]:
                tokens += choice.get("token_ids") or []
                finish = choice.get("finish_reason") or finish
    return tokens, finish
