"""The plugin's two KV paths, same run, same machine: paged (default) vs the MLX-managed cache.

    python -m benchmarks.investigations.paged_vs_mlx_cache [--device cpu|gpu] [--concurrency 1 8 32]
        [--num-prompts 100] [--max-tokens 64] [--out results.json]

Each path is a real ``vllm serve`` (``VLLM_METAL_USE_PAGED_ATTENTION=1`` / ``=0``) on the bundled
SmolLM2-135M fp32 checkpoint, driven by ``benchmarks.load`` (streaming chat, EOS suppressed so each
answer is exactly ``--max-tokens`` long) over the first ``--num-prompts`` of the fixed mixed-length
prompt set at each concurrency. Reports mean/p99 TTFT, mean TPOT, output tok/s and paged/MLX ratios.

Both servers run side by side and the paths take turns: each concurrency level is split into
rounds (at most ``--rounds``, each of at least 4 x concurrency prompts), and every round's prompts go
to both paths, in the order AB, BA, AB, ... A single stream is host-bound (kernel launches), and on
a shared host its speed drifts by tens of percent within minutes; measured one path after the other,
that drift lands in the ratio. Taking turns spreads it over both paths. Once both servers are up,
each gets two untimed requests, so neither's first requests land in a measured turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.load import run_clients, summarize
from benchmarks.prompts import eos_logit_bias, sweep_prompts
from benchmarks.sweep import _token_counter
from benchmarks.systems import Setup, VllmMetal


class VllmMetalMlxCache(VllmMetal):
    """The plugin with ``VLLM_METAL_USE_PAGED_ATTENTION=0`` (mlx-lm's per-request caches)."""

    name = "vllm-metal-mlx-cache"

    def env(self) -> dict[str, str]:
        return super().env() | {"VLLM_METAL_USE_PAGED_ATTENTION": "0"}


class VllmMetalPaged(VllmMetal):
    name = "vllm-metal-paged"

    def env(self) -> dict[str, str]:
        return super().env() | {"VLLM_METAL_USE_PAGED_ATTENTION": "1"}


def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def rounds(prompts: list[str], concurrency: int, max_rounds: int) -> list[list[str]]:
    """Consecutive chunks of ``prompts`` for taking turns: at most ``max_rounds``, each at least
    4 x ``concurrency`` prompts long (so a round still runs at full concurrency), at least one."""
    n = max(1, min(max_rounds, len(prompts) // (4 * concurrency)))
    bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
    return [prompts[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def warm_up(servers: list, prompts: list[str], bias: dict[str, float], count) -> None:
    """Two untimed requests per server once all are up. Without them a server's first requests, and
    the tail of starting the server after it, fall in the first measured turn: on an H200 the paged
    path's first turn, right after the MLX-managed server started, ran 7.0 ms steps, its later turn 5.6."""
    for server in servers:
        asyncio.run(run_clients(server.base_url, server.model_id, prompts[:2], 8, 1, bias, count))


def take_turns(servers: list, chunks: list[list[str]], max_tokens: int, concurrency: int,
               bias: dict[str, float], count) -> dict[str, tuple[list, float]]:
    """Each chunk to every server in turn (order AB, BA, ...): per server, all request results and
    the summed wall time, which ``benchmarks.load.summarize`` takes."""
    runs: dict[str, tuple[list, float]] = {s.name: ([], 0.0) for s in servers}
    for i, chunk in enumerate(chunks):
        for server in (servers if i % 2 == 0 else servers[::-1]):
            res, wall = asyncio.run(run_clients(server.base_url, server.model_id, chunk, max_tokens,
                                                concurrency, bias, count))
            done, total = runs[server.name]
            runs[server.name] = (done + res, total + wall)
    return runs


def table(results: dict) -> str:
    """Markdown: one row per concurrency, both paths and the paged/MLX ratios."""
    paged, mlx = results["vllm-metal-paged"], results["vllm-metal-mlx-cache"]
    lines = ["| concurrency | path | output tok/s | mean TTFT ms | p99 TTFT ms | mean TPOT ms | ok |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in paged:
        for name, res in (("paged", paged[c]), ("MLX-managed", mlx[c])):
            lines.append(f"| {c} | {name} | {_fmt(res['output_throughput'])} | "
                         f"{_fmt(res['mean_ttft_ms'])} | {_fmt(res['p99_ttft_ms'])} | "
                         f"{_fmt(res['mean_tpot_ms'])} | {res['completed']}/{res['num_prompts']} |")
        p, m = paged[c], mlx[c]
        lines.append(f"| {c} | **paged / MLX** | **{_fmt(p['output_throughput'] / m['output_throughput'], 2)}x** | "
                     f"{_fmt(p['mean_ttft_ms'] / m['mean_ttft_ms'], 2)}x | "
                     f"{_fmt(p['p99_ttft_ms'] / m['p99_ttft_ms'], 2)}x | "
                     f"{_fmt(p['mean_tpot_ms'] / m['mean_tpot_ms'], 2)}x | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from fixtures.bundled_model import ensure_default_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=25, help="turns each path takes per concurrency level "
                    "(at most; a turn has at least 4 x concurrency prompts): short turns cancel the host's drift")
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/paged_vs_mlx_cache.json"))
    args = ap.parse_args(argv)

    models = ensure_default_models()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = Setup(hf=models.hf, mlx=models.mlx, gguf=None, device=args.device, max_model_len=2048,
                  max_num_seqs=max(args.concurrency), kv_cache_gib=args.kv_cache_gib,
                  log_dir=args.out.parent / "logs")
    bias = eos_logit_bias(models.hf)
    prompts = sweep_prompts(args.num_prompts)
    count = _token_counter(models.hf)
    servers = [cls(setup) for cls in (VllmMetalPaged, VllmMetalMlxCache)]
    results: dict = {s.name: {} for s in servers}
    try:
        for server in servers:
            server.start(timeout=600)
            print(f"{server.name}: up in {server.startup_s:.1f}s", flush=True)
        warm_up(servers, prompts, bias, count)
        for c in args.concurrency:
            chunks = rounds(prompts, c, args.rounds)
            runs = take_turns(servers, chunks, args.max_tokens, c, bias, count)
            for server in servers:
                m = summarize(*runs[server.name]) | {"num_prompts": len(prompts), "rounds": len(chunks)}
                results[server.name][str(c)] = m
                print(f"  {server.name} c={c} ({len(chunks)} rounds): {_fmt(m['output_throughput'])} tok/s, "
                      f"TTFT {_fmt(m['mean_ttft_ms'])} ms (p99 {_fmt(m['p99_ttft_ms'])}), TPOT "
                      f"{_fmt(m['mean_tpot_ms'])} ms, {m['completed']}/{len(prompts)} ok", flush=True)
    finally:
        for server in servers:
            server.stop()
    md = table(results)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine.describe(),
            "versions": machine.versions(), "device": args.device,
            "command": "python -m benchmarks.investigations.paged_vs_mlx_cache " + " ".join(sys.argv[1:] if argv is None else argv),
            "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "rounds": args.rounds}
    args.out.write_text(json.dumps({"meta": meta, "results": results, "markdown": md}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
