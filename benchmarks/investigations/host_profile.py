"""Where a single-stream decode step's host time goes: vLLM's engine and the plugin under cProfile.

    python -m benchmarks.investigations.host_profile [--checkpoint llama-1b] [--tokens 256]
        [--model DIR] [--one-step-ahead 1] [--speculative-config JSON] [--device gpu] [--top 45]
        [--checkpoint-dir DIR] [--out profile.json]

One process, no server: vLLM's offline ``LLM`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the
engine core (scheduler, the plugin's worker and runner, the output processor) runs in this thread
and one ``cProfile`` sees all of it. After an untimed warm-up request, one greedy request of
``--tokens`` output tokens runs once without the profiler (its wall time per token is the step time
to compare with mlx-lm's loop) and once under it. The report lists the functions with the most own
time and the most cumulative time, per output token, so the plugin's share (``vllm_metal/``) and
vLLM's (scheduler, input batch, output processing) can be read side by side. cProfile adds
overhead per Python call, so read shares, not absolute times. Checkpoints as ``decode_sizes``
builds them (``tiny`` runs on a CPU in seconds), or ``--model DIR``. On MLX's CPU backend this
process imports MLX before the plugin could pick OpenBLAS for it, so CPU step times here are
slower than served ones; the host-side shares still hold.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path
from typing import Any

from benchmarks.investigations.decode_sizes import CHECKPOINTS, checkpoint


def _rows(stats: pstats.Stats, key: str, top: int, tokens: int) -> list[dict[str, Any]]:
    """The ``top`` functions by ``key`` ('tottime' or 'cumtime'), in microseconds per output token."""
    rows = []
    for (path, line, name), (_cc, calls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = path.split("site-packages/")[-1] if "site-packages/" in path else path
        short = short.split("/work/")[-1]
        rows.append({"function": f"{short}:{line}({name})", "calls_per_token": round(calls / tokens, 2),
                     "own_us": round(1e6 * tt / tokens, 1), "cum_us": round(1e6 * ct / tokens, 1)})
    rows.sort(key=lambda r: r["own_us" if key == "tottime" else "cum_us"], reverse=True)
    return rows[:top]


def _by_package(stats: pstats.Stats, tokens: int) -> dict[str, float]:
    """Own time per output token (us) summed by where the code lives."""
    groups: dict[str, float] = {}
    for (path, _line, _name), (_cc, _calls, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "vllm_metal/" in path:
            group = "vllm_metal/" + path.split("vllm_metal/")[-1]
        elif "site-packages/" in path:
            group = path.split("site-packages/")[-1].split("/")[0]
        elif path == "~":
            group = "builtins (C functions, MLX and torch ops)"
        else:
            group = "python stdlib/other"
        groups[group] = groups.get(group, 0.0) + 1e6 * tt / tokens
    return dict(sorted(((k, round(v, 1)) for k, v in groups.items()), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="llama-1b", choices=sorted(CHECKPOINTS))
    parser.add_argument("--model", type=Path, help="a checkpoint directory instead (e.g. the bundled model)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--one-step-ahead", default="1", choices=("auto", "1", "0"))
    parser.add_argument("--device", default="gpu", choices=("cpu", "gpu"))
    parser.add_argument("--speculative-config", type=json.loads, default=None,
                        help='as vllm serve\'s, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/vllm-metal-sizes"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_MLX_DEVICE": args.device,
                       "VLLM_METAL_ONE_STEP_AHEAD": args.one_step_ahead})
    from vllm import LLM, SamplingParams

    model = args.model or checkpoint(args.checkpoint_dir, args.checkpoint, seed=0)
    name = args.model.name if args.model else args.checkpoint
    dtype = "bfloat16" if args.device == "gpu" else "float32"
    llm = LLM(model=str(model), dtype=dtype, kv_cache_memory_bytes=2 << 30, max_num_seqs=8,
              max_model_len=2048, enable_prefix_caching=False,
              speculative_config=args.speculative_config)
    prompt = {"prompt_token_ids": list(range(100, 228))}
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)

    t0 = time.perf_counter()
    plain = llm.generate([prompt], params, use_tqdm=False)[0]
    wall = time.perf_counter() - t0
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    profiled = llm.generate([prompt], params, use_tqdm=False)[0]
    profiler.disable()
    profiled_wall = time.perf_counter() - t0
    same = plain.outputs[0].token_ids == profiled.outputs[0].token_ids

    stats = pstats.Stats(profiler, stream=io.StringIO())
    n = args.tokens
    report = {
        "checkpoint": name, "device": args.device, "dtype": dtype,
        "one_step_ahead": args.one_step_ahead, "speculative_config": args.speculative_config, "tokens": n,
        "ms_per_token": round(1e3 * wall / n, 3), "ms_per_token_profiled": round(1e3 * profiled_wall / n, 3),
        "same_tokens_both_runs": same,
        "own_time_by_package_us": _by_package(stats, n),
        "top_own": _rows(stats, "tottime", args.top, n),
        "top_cumulative": _rows(stats, "cumtime", args.top, n),
    }
    print(f"{name} {dtype} on {args.device}, one step ahead {args.one_step_ahead}: "
          f"{report['ms_per_token']} ms/token ({report['ms_per_token_profiled']} profiled), same tokens {same}")
    print("own time per token by package (us):")
    for k, v in report["own_time_by_package_us"].items():
        print(f"  {v:9.1f}  {k}")
    for title, key in (("most own time", "top_own"), ("most cumulative time", "top_cumulative")):
        print(f"{title} (us per token, calls per token):")
        for r in report[key]:
            print(f"  {r['own_us']:9.1f} own {r['cum_us']:9.1f} cum {r['calls_per_token']:7.2f}x  {r['function']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
