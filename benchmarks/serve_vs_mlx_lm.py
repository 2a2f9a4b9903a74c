"""Decode speed of `vllm serve` with vllm-metal vs mlx-lm's own generate loop, same checkpoint.

    python -m benchmarks.serve_vs_mlx_lm [--model DIR] [--tokens 64] [--concurrency 1 4 16]

Reports, in one run on one machine: server startup time; single-stream decode tok/s (streamed,
time after the first token) for the plugin and for ``mlx_lm.generate_step``; aggregate output
tok/s at each concurrency level (completion tokens / wall clock). Ratios are plugin / mlx-lm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def stream_decode_rate(base: str, model: str, n: int) -> tuple[float, float]:
    """(TTFT seconds, decode tok/s after the first token) for one streamed completion."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0 = time.perf_counter()
    stamps = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    ttft = stamps[0] - t0
    return ttft, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def aggregate_rate(base: str, model: str, n: int, concurrency: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}

    def one(_):
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=1200)
        return r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(one, range(concurrency)))
    return total / (time.perf_counter() - t0)


def mlx_lm_decode_rate(model_dir: Path, n: int) -> float:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(str(model_dir))
    ids = mx.array(tok.encode(PROMPT))
    stamps = []
    for _ in generate_step(ids, model, max_tokens=n):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> int:
    from conftest import VllmServer

    from vllm_metal.models.default_model import ensure_default_models

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None, help="MLX checkpoint (default: bundled fp32)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    model_dir = args.model or ensure_default_models().mlx
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.perf_counter()
    srv = VllmServer(model_dir, ["--dtype", args.dtype, "--max-model-len", "1024",
                                 "--max-num-seqs", str(max(args.concurrency)),
                                 "--kv-cache-memory-bytes", str(512 * 2**20)], name="bench")
    startup = time.perf_counter() - t0
    try:
        stream_decode_rate(srv.base, srv.model, 8)  # warm
        ttft, plugin_rate = stream_decode_rate(srv.base, srv.model, args.tokens)
        agg = {c: aggregate_rate(srv.base, srv.model, args.tokens, c) for c in args.concurrency}
    finally:
        srv.stop()
    mlx_rate = mlx_lm_decode_rate(model_dir, args.tokens)

    import mlx.core as mx

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, MLX device {mx.default_device()}")
    print(f"model: {model_dir} dtype {args.dtype}; {args.tokens} new tokens")
    print(f"vllm serve startup (to /health 200): {startup:.1f} s")
    print(f"single stream decode: plugin {plugin_rate:.2f} tok/s (TTFT {ttft:.2f} s), "
          f"mlx_lm.generate_step {mlx_rate:.2f} tok/s, ratio {plugin_rate / mlx_rate:.2f}")
    for c, rate in agg.items():
        print(f"aggregate output tok/s at concurrency {c:>2}: {rate:.2f} "
              f"({rate / mlx_rate:.2f}x single-stream mlx-lm)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
