"""The seed's single-stream protocol (its llama.cpp comparison table).

For each ``max_tokens`` in (128, 512, 1024, 2048): 3 prompts x 3 runs, one request at a time,
non-streamed; throughput = completion_tokens / wall-clock of the request. Reported per system as
mean and min-max over the 9 requests.
"""

from __future__ import annotations

from typing import Any

from benchmarks.load import timed_chat
from benchmarks.prompts import PROTOCOL_PROMPTS, chat_body
from benchmarks.systems import Server

MAX_TOKENS = (128, 512, 1024, 2048)


def run_protocol(server: Server, max_tokens: list[int], n_prompts: int, runs: int,
                 bias: dict[str, float], log=print) -> dict[str, Any]:
    """``{str(max_tokens): {"runs": [...], "mean", "min", "max"}}`` for one started server."""
    out: dict[str, Any] = {}
    for n in max_tokens:
        rows = []
        for run in range(runs):
            for i, prompt in enumerate(PROTOCOL_PROMPTS[:n_prompts]):
                tokens, wall = timed_chat(server.base_url, chat_body(server.model_id, prompt, n, bias))
                rows.append({"prompt": i, "run": run, "completion_tokens": tokens, "wall_s": wall,
                             "tok_s": tokens / wall})
        rates = [r["tok_s"] for r in rows]
        out[str(n)] = {"runs": rows, "mean": sum(rates) / len(rates), "min": min(rates),
                       "max": max(rates),
                       "completion_tokens": sorted({r["completion_tokens"] for r in rows})}
        log(f"  protocol max_tokens={n}: {out[str(n)]['mean']:.1f} tok/s "
            f"({out[str(n)]['min']:.1f}-{out[str(n)]['max']:.1f})")
    return out
