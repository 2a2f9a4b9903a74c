"""One layer's attention for a batched step: the paged kernel against the MLX-op path.

    python -m benchmarks.investigations.paged_kernel [--geometry llama-1b llama-8b] [--dtype bfloat16]
        [--repeat 50] [--out results.json]

Each case is one step's attention of one layer through ``PagedLayerCache.attend`` (what the model
calls), on random pools behind random block tables: decode batches of 16, 32 and 64 sequences at
~2k and ~8k tokens of context (contexts spread +-25% around the figure), a step of four 2048-token
prefill chunks, and one 2048-token chunk at 6k beside 15 decodes. Per path: the first call
(kernel compilation, or cuDNN's graph build for a new shape) and the median of ``--repeat`` calls
after it, each evaluated on its own; plus the bytes of K/V the step must read once (its floor at
the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from benchmarks import machine
from vllm_metal.attention import LayerSpec, PagedKVStore, PagedLayerCache, build_step_metadata
from vllm_metal.device import gpu_backend
from vllm_metal.paged_kernel import PagedKernel

GEOMETRIES = {"llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128)}  # query heads, K/V heads, head dim
BLOCK = 16


def cases() -> dict[str, list[tuple[int, int]]]:
    """name -> (query rows, first position) per sequence."""
    rng = np.random.default_rng(0)

    def decodes(s: int, ctx: int) -> list[tuple[int, int]]:
        return [(1, int(c)) for c in rng.integers(int(ctx * 0.75), int(ctx * 1.25), s)]

    out = {f"decode {s} x ~{ctx // 1000}k": decodes(s, ctx) for ctx in (2000, 8000) for s in (16, 32, 64)}
    out["prefill 4 x 2048 chunks"] = [(2048, 0)] * 4
    out["15 decodes ~2k + 2048 chunk at 6k"] = decodes(15, 2000) + [(2048, 6144)]
    return out


def one_case(seqs: list[tuple[int, int]], heads: int, kv_heads: int, d: int, dtype: mx.Dtype,
             kernel: PagedKernel | None, repeat: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    need = [-(-(p + n) // BLOCK) for n, p in seqs]
    num_blocks = 1 + sum(need)
    ids = rng.permutation(np.arange(1, num_blocks))
    tables, at = [], 0
    for k in need:
        tables.append(ids[at: at + k].astype(np.int32))
        at += k
    slots = num_blocks * BLOCK
    store = PagedKVStore([LayerSpec(heads, kv_heads, d, d, None)], num_blocks, BLOCK, dtype, kernel=kernel)
    store.k[0] = mx.random.normal((slots, kv_heads, 1, d)).astype(dtype)
    store.v[0] = mx.random.normal((slots, kv_heads, 1, d)).astype(dtype)
    t = sum(n for n, _ in seqs)
    q = mx.random.normal((t, heads, 1, d)).astype(dtype)
    mx.eval(store.k[0], store.v[0], q)
    lens, starts = [n for n, _ in seqs], [p for _, p in seqs]
    cache = PagedLayerCache(store, 0, None)

    def call() -> float:
        store.steps = [build_step_metadata(lens, starts, tables, BLOCK, store.limits, kernel is not None)]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(cache.attend(q, d**-0.5, None))
        mx.synchronize()
        return (time.perf_counter() - t0) * 1000

    first = call()
    times = [call() for _ in range(repeat)]
    kv_bytes = sum(p + n for n, p in seqs) * kv_heads * d * 2 * dtype.size
    return {"first_ms": first, "median_ms": statistics.median(times), "kv_bytes": kv_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", nargs="+", choices=list(GEOMETRIES), default=list(GEOMETRIES))
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/paged_kernel.json"))
    args = ap.parse_args(argv)
    backend = gpu_backend()
    if backend is None or mx.default_device().type != mx.DeviceType.gpu:
        print("paged_kernel: needs MLX on a GPU", file=sys.stderr)
        return 2
    from benchmarks.investigations.decode_roofline import bandwidth_gbs

    gbs = bandwidth_gbs()
    dtype = getattr(mx, args.dtype)
    report: dict[str, Any] = {"machine": machine.describe(), "versions": machine.versions(),
                              "command": " ".join(sys.argv), "bandwidth_gbs": gbs, "rows": []}
    lines = ["| geometry | step | MLX ops ms (first) | kernel ms (first) | ops / kernel | kernel vs K/V floor |",
             "| --- | --- | --- | --- | --- | --- |"]
    for geo in args.geometry:
        heads, kv_heads, d = GEOMETRIES[geo]
        for name, seqs in cases().items():
            row: dict[str, Any] = {"geometry": geo, "step": name}
            for label, kernel in (("ops", None), ("kernel", PagedKernel(backend))):
                try:
                    row[label] = one_case(seqs, heads, kv_heads, d, dtype, kernel, args.repeat)
                except Exception as exc:  # noqa: BLE001 - one failing case is recorded, the rest run
                    row[label] = {"error": f"{type(exc).__name__}: {exc}"}
                mx.clear_cache()
            report["rows"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
            o, k = row["ops"], row["kernel"]
            if "error" in o or "error" in k:
                lines.append(f"| {geo} | {name} | {o.get('error', '')} | {k.get('error', '')} | | |")
                continue
            floor = k["kv_bytes"] / (gbs * 1e9) * 1000
            lines.append(f"| {geo} | {name} | {o['median_ms']:.3f} ({o['first_ms']:.1f}) | "
                         f"{k['median_ms']:.3f} ({k['first_ms']:.1f}) | {o['median_ms'] / k['median_ms']:.2f} | "
                         f"{floor / k['median_ms']:.0%} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
