"""Where a served single-stream decode step's host time goes, paged vs the MLX-managed KV path.

    python -m benchmarks.investigations.served_steps [--device cpu|gpu] [--num-prompts 24] [--max-tokens 64]
        [--rounds 6] [--no-prefix-caching] [--kv-cache-gib 1.0] [--out results.json]

Both paths run as real ``vllm serve`` with ``VLLM_METAL_DEBUG=1``, side by side, taking turns over
the same sequential streamed chat requests (as ``paged_vs_mlx_cache`` does). Each one-token decode
step's debug record (``StepRecord``) is read; the report gives medians per path of ``forward`` (execute_model) and
its ``launch`` (kernels encoded and submitted) and ``wait`` (for the device) parts, ``sample``,
``outside`` (the engine between steps), and the client-side TPOT. ``--no-prefix-caching`` gives every
request fresh consecutive blocks (no prefix hit, so no gather on the paged path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.investigations.paged_vs_mlx_cache import (
    VllmMetalMlxCache,
    VllmMetalPaged,
    rounds,
    take_turns,
    warm_up,
)
from benchmarks.load import summarize
from benchmarks.prompts import eos_logit_bias, sweep_prompts
from benchmarks.sweep import _token_counter
from benchmarks.systems import Setup
from vllm_metal.model_runner import StepRecord

FIELDS = ("forward", "launch", "wait", "between", "sample", "outside")


def _records(log: str) -> list[StepRecord]:
    return [r for r in map(StepRecord.from_log, log.splitlines()) if r is not None]


def _is_decode(r: StepRecord) -> bool:
    """A single-sequence one-token step."""
    return r.reqs == 1 and r.tokens == 1 and r.decode == 1


def _step(r: StepRecord) -> dict[str, float]:
    """A step's times in ms, and ``moved``: the blocks the paged placement moved in it."""
    step = {f: getattr(r, f"{f}_ms") for f in FIELDS}
    step["moved"] = float(r.moved_blocks)
    return step


def decode_steps(log: str) -> list[dict[str, float]]:
    """Every single-sequence one-token step of a ``VLLM_METAL_DEBUG=1`` server log, in ms."""
    return [_step(r) for r in _records(log) if _is_decode(r)]


def moves(steps: list[dict[str, float]]) -> dict[str, float]:
    """Means over all decode steps (a block move is rare, so medians hide it) and over the steps
    that moved blocks: what the placement costs per token."""
    moving = [s for s in steps if s["moved"]]
    mean = lambda rows, f: statistics.fmean(r[f] for r in rows) if rows else float("nan")  # noqa: E731
    return {"mean_forward_ms": mean(steps, "forward"), "mean_launch_ms": mean(steps, "launch"),
            "mean_wait_ms": mean(steps, "wait"), "steps_moving": len(moving),
            "blocks_moved": sum(s["moved"] for s in moving),
            "mean_forward_moving_ms": mean(moving, "forward")}


def request_steps(log: str) -> list[list[dict[str, float]]]:
    """The one-token decode steps of each single-stream request, in order: a step that decodes no
    token (a prefill chunk) starts the next request; requests without decode steps are dropped."""
    requests: list[list[dict[str, float]]] = []
    for r in _records(log):
        if r.reqs != 1:
            continue
        if r.decode == 0:
            if not requests or requests[-1]:
                requests.append([])
        elif requests and _is_decode(r):
            requests[-1].append(_step(r))
    return [r for r in requests if r]


def host_ms(step: dict[str, float]) -> float:
    """A step's host time outside the launch and the wait: state, metadata, recording the graph."""
    return step["forward"] - step["launch"] - step["wait"]


def turns(requests: list[list[dict[str, float]]], sizes: list[int]) -> list[dict[str, float]]:
    """Per turn (``sizes``: requests per turn, in order): medians of forward, launch, and host time on
    a request's first two decode steps and from its eleventh on. A path's first turn after start-up
    and a request's first steps after its prefill have each differed from the rest."""
    out, i = [], 0
    for n in sizes:
        reqs, i = requests[i : i + n], i + n
        steps = [s for r in reqs for s in r]
        if not steps:
            continue
        first = [host_ms(s) for r in reqs for s in r[:2]]
        later = [host_ms(s) for r in reqs for s in r[10:]]
        out.append({"requests": len(reqs), "forward": statistics.median(s["forward"] for s in steps),
                    "launch": statistics.median(s["launch"] for s in steps),
                    "host_first_steps": statistics.median(first),
                    "host_later_steps": statistics.median(later) if later else float("nan")})
    return out


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
    from fixtures.bundled_model import ensure_default_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6, help="turns per path (at most; 4+ requests each)")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0,
                    help="--kv-cache-memory-bytes of both servers (the paged pool's size)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/served_steps.json"))
    args = ap.parse_args(argv)

    models = ensure_default_models()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = Setup(hf=models.hf, mlx=models.mlx, gguf=None, device=args.device, max_model_len=2048,
                  max_num_seqs=8, kv_cache_gib=args.kv_cache_gib, log_dir=args.out.parent / "logs")
    bias, count = eos_logit_bias(models.hf), _token_counter(models.hf)
    prompts = sweep_prompts(args.num_prompts)
    servers = [_debug(cls, not args.no_prefix_caching)(setup) for cls in (VllmMetalPaged, VllmMetalMlxCache)]
    try:
        for server in servers:
            server.start(timeout=600)
        warm_up(servers, prompts, bias, count)
        marks = {s.name: len(s.log_path.read_text(errors="replace")) for s in servers}  # after warm-up
        chunks = rounds(prompts, 1, args.rounds)
        runs = take_turns(servers, chunks, args.max_tokens, 1, bias, count)
        logs = {s.name: s.log_path.read_text(errors="replace")[marks[s.name]:] for s in servers}
    finally:
        for server in servers:
            server.stop()
    results = {}
    for name, log in logs.items():
        steps = decode_steps(log)
        client = summarize(*runs[name])
        results[name] = {"steps": len(steps), "median_ms": medians(steps), "moves": moves(steps),
                         "client_tpot_ms": client["mean_tpot_ms"], "completed": client["completed"],
                         "turns": turns(request_steps(log), [len(c) for c in chunks])}
    lines = ["| path | steps | client TPOT ms | " + " | ".join(f"{f} ms" for f in FIELDS) + " |",
             "| --- " * (3 + len(FIELDS)) + "|"]
    for name, r in results.items():
        cells = " | ".join(f"{r['median_ms'].get(f, float('nan')):.2f}" for f in FIELDS)
        lines.append(f"| {name} | {r['steps']} | {r['client_tpot_ms']:.2f} | {cells} |")
    lines += ["", "| path | mean forward ms | mean launch ms | mean wait ms | steps that moved blocks | "
              "blocks moved | their mean forward ms |", "| --- " * 7 + "|"]
    for name, r in results.items():
        m = r["moves"]
        lines.append(f"| {name} | {m['mean_forward_ms']:.2f} | {m['mean_launch_ms']:.2f} | "
                     f"{m['mean_wait_ms']:.2f} | {m['steps_moving']} | {m['blocks_moved']:.0f} | "
                     f"{m['mean_forward_moving_ms']:.2f} |")
    lines += ["", "| path | turn | requests | forward ms | launch ms | host ms, decode steps 1-2 | "
              "host ms, steps 11+ |", "| --- " * 7 + "|"]
    for name, r in results.items():
        for k, t in enumerate(r["turns"], 1):
            lines.append(f"| {name} | {k} | {t['requests']} | {t['forward']:.2f} | {t['launch']:.2f} | "
                         f"{t['host_first_steps']:.2f} | {t['host_later_steps']:.2f} |")
    md = "\n".join(lines) + "\n"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine.describe(),
            "versions": machine.versions(), "device": args.device,
            "command": "python -m benchmarks.investigations.served_steps " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.write_text(json.dumps({"meta": meta, "results": results, "markdown": md}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
