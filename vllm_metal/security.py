"""``--api-key`` guards every route except the health checks.

vLLM 0.32's ``AuthenticationMiddleware`` only checks paths under ``/v1``, ``/v2``, ``/inference``
and ``/cohere``: with ``--api-key`` set, ``/invocations`` (a full completions/chat endpoint),
``/tokenize``, ``/detokenize``, ``/metrics``, ``/load``, ``/scale_elastic_ep``, ``/docs`` and
``/openapi.json`` still answer anyone. We make the same middleware check every path except the
liveness probes ``/health`` and ``/ping``, which reveal nothing. Delete this when vLLM's
``GUARDED_PREFIX`` check is gone (vllm/entrypoints/serve/middleware/authenticate.py).
"""

from __future__ import annotations

import sys

OPEN_PATHS = frozenset({"/health", "/ping"})


def guard_all_routes() -> None:
    """Patch vLLM's API-key middleware in an API server process (one that imported FastAPI)."""
    if "fastapi" not in sys.modules:
        return
    from starlette.datastructures import Headers
    from starlette.responses import JSONResponse
    from vllm.entrypoints.serve.middleware import authenticate

    cls = authenticate.AuthenticationMiddleware
    if getattr(cls, "_vllm_metal_guards_all", False):
        return

    def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path not in OPEN_PATHS and not self.verify_token(Headers(scope=scope)):
                return JSONResponse(content={"error": "Unauthorized"}, status_code=401)(scope, receive, send)
        return self.app(scope, receive, send)

    cls.__call__ = __call__
    cls._vllm_metal_guards_all = True
