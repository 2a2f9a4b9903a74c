"""Batched decode over long contexts: the plugin (paged kernel, MLX ops) against mlx_lm.server.

    python -m benchmarks.investigations.long_context [--shape llama-1b] [--prompt-tokens 2000 8000]
        [--concurrency 16 32] [--systems kernel ops mlx-lm] [--max-tokens 128] [--out results.json]

The checkpoint is ``long_prompts``' random-weight Llama (built on the machine, the bundled
tokenizer). Per prompt length and concurrency C, C clients each send one streamed chat request
at once, a prompt of about ``P`` tokens (random words of the vocabulary, distinct per client from
the first word, so no server can reuse another request's prefix), ``max_tokens`` greedy tokens
(special tokens suppressed by ``logit_bias``, honoured by both servers). Reported per system:
output tok/s over the wall clock, mean TTFT, mean TPOT (``(latency - TTFT) / (tokens - 1)``: the
decode steps, with the other requests' prefill chunks that land between them), failures.
Systems: ``kernel`` = ``vllm serve`` with ``VLLM_METAL_ATTENTION_KERNEL=on``, ``ops`` = the same
with ``off``, ``mlx-lm`` = ``mlx_lm.server`` on the same weights. Each server first answers C
short requests at once (first-use kernel compilation), untimed; a server is restarted before the
next level after a level with failed requests (mlx_lm.server running out of device memory) or when
it stops answering, and the restart recorded. JSON (``--out``) after every level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.investigations.decode_sizes import Plugin
from benchmarks.investigations.long_prompts import ensure_checkpoint
from benchmarks.load import run_clients, summarize
from benchmarks.prompts import eos_logit_bias
from benchmarks.systems import MlxLm, Server, Setup


def plugin(setup: Setup, kernel: str) -> Server:
    """``vllm serve`` at bf16 (``decode_sizes``' server, one step ahead on) with the paged
    attention kernel on or off."""
    return Plugin(setup, "1", name=f"vllm-metal-kernel-{kernel}", extra_env={"VLLM_METAL_ATTENTION_KERNEL": kernel})


def long_prompts(hf_dir: Path, tokens: int, count: int, seed: int) -> list[str]:
    """``count`` distinct texts of about ``tokens`` tokens in the checkpoint's tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    words = [w.lstrip("Ġ") for w, i in tok.get_vocab().items()
             if w.startswith("Ġ") and w[1:].isalpha() and w[1:].islower() and len(w) > 3]
    rng = random.Random(seed)
    out = []
    for k in range(count):
        text = f"Request {k}: " + " ".join(rng.choice(words) for _ in range(tokens))
        ids = tok.encode(text).ids[:tokens]
        out.append(tok.decode(ids))
    return out


def serves(server: Server, bias: dict[str, float]) -> bool:
    """Whether the server still answers a short request (mlx_lm.server's process outlives its
    generation thread, e.g. after running out of device memory, and then answers 404)."""
    return server.alive() and run_level(server, ["Say hi."], 2, bias)["completed"] == 1


def run_level(server: Server, prompts: list[str], max_tokens: int, bias: dict[str, float]) -> dict[str, Any]:
    results, wall = asyncio.run(run_clients(server.base_url, server.model_id, prompts, max_tokens, len(prompts),
                                            bias, count_tokens=lambda text: 0))
    return summarize(results, wall)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("llama-1b", "llama-8b"), default="llama-1b")
    ap.add_argument("--prompt-tokens", nargs="+", type=int, default=[2000, 8000])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[16, 32])
    ap.add_argument("--systems", nargs="+", choices=("kernel", "ops", "mlx-lm"), default=["kernel", "ops", "mlx-lm"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--kv-cache-gib", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/vllm-metal-sizes"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/long_context.json"))
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.checkpoint_dir / args.shape
    ensure_checkpoint(path, args.shape, args.seed)
    import mlx.core as mx

    mx.clear_cache()
    bias = eos_logit_bias(path)
    setup = Setup(hf=path, mlx=path, gguf=None, device=args.device,
                  max_model_len=max(args.prompt_tokens) + args.max_tokens + 256,
                  max_num_seqs=max(args.concurrency), kv_cache_gib=args.kv_cache_gib, log_dir=args.out.parent / "logs")
    report: dict[str, Any] = {"machine": machine.describe(), "versions": machine.versions(),
                              "command": " ".join(sys.argv), "shape": args.shape, "servers": []}
    for system in args.systems:
        server = MlxLm(setup) if system == "mlx-lm" else plugin(setup, "on" if system == "kernel" else "off")
        entry: dict[str, Any] = {"server": server.name, "levels": []}
        report["servers"].append(entry)
        try:
            server.start(timeout=900)
            warm = [f"Say hello number {i}." for i in range(max(args.concurrency))]
            run_level(server, warm, 8, bias)
            for p in args.prompt_tokens:
                for c in args.concurrency:
                    # A level that failed requests (e.g. ran the server out of memory) must not void the
                    # next ones: restart after any failure, or when the server no longer answers.
                    if (entry["levels"] and entry["levels"][-1]["failed"]) or not serves(server, bias):
                        entry.setdefault("restarts", []).append({"before": [p, c], "log_tail": server.log_tail()})
                        server.stop()
                        server.start(timeout=900)
                        run_level(server, warm, 8, bias)
                    r = run_level(server, long_prompts(path, p, c, args.seed + p + c), args.max_tokens, bias)
                    entry["levels"].append({"prompt_tokens": p, "concurrency": c, **r})
                    print(f"  {server.name} P={p} C={c}: {r['output_throughput']:.0f} tok/s, TTFT "
                          f"{r['mean_ttft_ms']:.0f} ms, TPOT {r['mean_tpot_ms']:.1f} ms, failed {r['failed']}",
                          flush=True)
                    args.out.write_text(json.dumps(report, indent=1))
        except Exception as exc:  # noqa: BLE001 - a server that fails is recorded, the rest still run
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["log_tail"] = server.log_tail()
            print(f"  {server.name}: {exc}", flush=True)
        finally:
            server.stop()
        args.out.write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    """Markdown: per (prompt tokens, clients), each system's TPOT ms and tok/s."""
    keys = sorted({(r["prompt_tokens"], r["concurrency"]) for s in report["servers"] for r in s["levels"]})
    lines = ["| prompt tokens | clients | " + " | ".join(s["server"] for s in report["servers"]) + " |",
             "| --- | --- | " + " | ".join("---" for _ in report["servers"]) + " |"]
    for p, c in keys:
        cells = []
        for s in report["servers"]:
            r = next((r for r in s["levels"] if (r["prompt_tokens"], r["concurrency"]) == (p, c)), None)
            cells.append("" if r is None else f"TPOT {r['mean_tpot_ms']:.1f} ms, {r['output_throughput']:.0f} tok/s, "
                         f"TTFT {r['mean_ttft_ms'] / 1000:.1f} s" + (f", {r['failed']} failed" if r["failed"] else ""))
        lines.append(f"| {p} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
