"""``--api-key`` guards every route except the health checks.

vLLM 0.32's ``AuthenticationMiddleware`` only checks paths under ``/v1``, ``/v2``, ``/inference``
and ``/cohere``: with ``--api-key`` set, ``/invocations`` (a full completions/chat endpoint),
``/tokenize``, ``/detokenize``, ``/metrics``, ``/load``, ``/scale_elastic_ep``, ``/docs`` and
``/openapi.json`` still answer anyone. ``patches.vllm.guard_all_routes`` makes the same
middleware check every path except the liveness probes ``/health`` and ``/ping``, which reveal
nothing.
"""

from __future__ import annotations

OPEN_PATHS = frozenset({"/health", "/ping"})


def requires_key(scope: dict) -> bool:
    """Whether an ASGI request must carry the API key: every HTTP or WebSocket request except
    CORS preflights (OPTIONS) and the liveness probes."""
    if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
        return False
    return scope["path"].removeprefix(scope.get("root_path", "")) not in OPEN_PATHS
