"""Where a served single-stream decode step's host time goes, paged vs the MLX-managed KV path.

    python -m benchmarks.served_steps [--device cpu|gpu] [--num-prompts 24] [--max-tokens 64]
        [--rounds 4] [--no-prefix-caching] [--out results.json]

Both paths run as real ``vllm serve`` with ``VLLM_METAL_DEBUG=1``, side by side, taking turns over
the same sequential streamed chat requests (as ``paged_vs_mlx_cache`` does). Each one-token decode
step's debug line is parsed; the report gives medians per path of ``forward`` (execute_model) and
its ``launch`` (kernels encoded and submitted) and ``wait`` (for the device) parts, ``sample``,
``outside`` (the engine between steps), and the client-side TPOT. ``--no-prefix-caching`` gives every
request fresh consecutive blocks (no prefix hit, so no gather on the paged path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.load import run_clients, summarize
from benchmarks.paged_vs_mlx_cache import VllmMetalMlxCache, VllmMetalPaged, rounds, take_turns
from benchmarks.prompts import eos_logit_bias, sweep_prompts
from benchmarks.sweep import _token_counter
from benchmarks.systems import Setup

FIELDS = ("forward", "launch", "wait", "between", "sample", "outside")
_DECODE_STEP = re.compile(
    r"vllm-metal step: 1 reqs, 1 tokens \(1 decode\), forward ([\d.]+) ms \(launch ([\d.]+) ms, "
    r"wait ([\d.]+) ms\), between ([\d.]+) ms, sample ([\d.]+) ms, outside ([\d.]+|nan) ms"
)


def decode_steps(log: str) -> list[dict[str, float]]:
    """Every single-sequence one-token step of a ``VLLM_METAL_DEBUG=1`` server log, in ms."""
    return [dict(zip(FIELDS, map(float, m.groups()), strict=True)) for m in _DECODE_STEP.finditer(log)]


def medians(steps: list[dict[str, float]]) -> dict[str, float]:
    return {f: statistics.median(s[f] for s in steps if s[f] == s[f]) for f in FIELDS} if steps else {}


def _debug(cls: type, prefix_caching: bool) -> type:
    class Debug(cls):
        def env(self) -> dict[str, str]:
            return super().env() | {"VLLM_METAL_DEBUG": "1"}

        def extra_args(self) -> list[str]:
            return super().extra_args() + ([] if prefix_caching else ["--no-enable-prefix-caching"])

    return Debug


def main(argv: list[str] | None = None) -> int:
    from vllm_metal.models.default_model import ensure_default_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/served_steps.json"))
    args = ap.parse_args(argv)

    models = ensure_default_models()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = Setup(hf=models.hf, mlx=models.mlx, gguf=None, device=args.device, max_model_len=2048,
                  max_num_seqs=8, kv_cache_gib=1.0, log_dir=args.out.parent / "logs")
    bias, count = eos_logit_bias(models.hf), _token_counter(models.hf)
    prompts = sweep_prompts(args.num_prompts)
    servers = [_debug(cls, not args.no_prefix_caching)(setup) for cls in (VllmMetalPaged, VllmMetalMlxCache)]
    marks: dict[str, int] = {}
    try:
        for server in servers:
            server.start(timeout=600)
            asyncio.run(run_clients(server.base_url, server.model_id, prompts[:2], 8, 1, bias, count))
            marks[server.name] = len(server.log_path.read_text(errors="replace"))  # after warm-up
        runs = take_turns(servers, rounds(prompts, 1, args.rounds), args.max_tokens, 1, bias, count)
        logs = {s.name: s.log_path.read_text(errors="replace")[marks[s.name]:] for s in servers}
    finally:
        for server in servers:
            server.stop()
    results = {}
    for name, log in logs.items():
        steps = decode_steps(log)
        client = summarize(*runs[name])
        results[name] = {"steps": len(steps), "median_ms": medians(steps),
                         "client_tpot_ms": client["mean_tpot_ms"], "completed": client["completed"]}
    lines = ["| path | steps | client TPOT ms | " + " | ".join(f"{f} ms" for f in FIELDS) + " |",
             "| --- " * (3 + len(FIELDS)) + "|"]
    for name, r in results.items():
        cells = " | ".join(f"{r['median_ms'].get(f, float('nan')):.2f}" for f in FIELDS)
        lines.append(f"| {name} | {r['steps']} | {r['client_tpot_ms']:.2f} | {cells} |")
    md = "\n".join(lines) + "\n"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine.describe(),
            "versions": machine.versions(), "device": args.device,
            "command": "python -m benchmarks.served_steps " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.write_text(json.dumps({"meta": meta, "results": results, "markdown": md}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
