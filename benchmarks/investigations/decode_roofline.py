"""Single-stream decode against the memory-bandwidth limit, plugin vs ``mlx_lm.generate``.

    python -m benchmarks.investigations.decode_roofline [--tokens 256] [--dtype float32 bfloat16] [--out f.json]

Batch-1 decode reads every weight once per token, so its ceiling is measured device bandwidth /
weight bytes. For each dtype: the device's copy bandwidth (MLX, read + write), mlx-lm's own
``generate_step`` rate, and the plugin's streamed rate through ``vllm serve`` with
``VLLM_METAL_DEBUG=1``, whose per-step log splits each token's time into the MLX forward and the
rest (vLLM's scheduler, sampler, detokenizer, HTTP streaming).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import mlx.core as mx

from benchmarks.investigations.served_steps import decode_steps
from benchmarks.systems import Setup, VllmMetal

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def bandwidth_gbs(nbytes: int = 2**31, reps: int = 10) -> float:
    """Device copy bandwidth in GB/s (bytes read + written), the best of ``reps`` copies."""
    a = mx.zeros((nbytes // 4,), dtype=mx.float32)
    mx.eval(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b = a + 1
        mx.eval(b)
        best = min(best, time.perf_counter() - t0)
        del b
    return 2 * nbytes / best / 1e9


def mlx_lm_rate(model_dir: Path, dtype: str, n: int) -> tuple[float, int]:
    """(decode tok/s after the first token, weight bytes) of mlx-lm's own loop."""
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_config

    from vllm_metal.mlx_lm_models import prepare_mlx_lm

    model, tok = load(str(model_dir), model_config=prepare_mlx_lm(load_config(model_dir)))  # the plugin's config fixes
    model.set_dtype(getattr(mx, dtype))
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    ids = mx.array(tok.encode(PROMPT))
    stamps = [time.perf_counter() for _ in generate_step(ids, model, max_tokens=n)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), weight_bytes


def plugin_rate(setup: Setup, dtype: str, n: int) -> dict:
    """Streamed decode rate through ``vllm serve`` and the median per-step forward time."""
    class Debug(VllmMetal):
        def command(self) -> list[str]:
            cmd = super().command()
            cmd[cmd.index("--dtype") + 1] = dtype
            return cmd

        def env(self) -> dict[str, str]:
            return super().env() | {"VLLM_METAL_DEBUG": "1"}

    server = Debug(setup)
    server.start(timeout=600)
    try:
        body = {"model": server.model_id, "prompt": PROMPT, "max_tokens": n, "temperature": 0,
                "ignore_eos": True, "stream": True}
        for _ in range(2):  # the first run warms up MLX's kernels and buffer cache
            stamps = []
            with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        if json.loads(line[6:])["choices"][0]["text"]:
                            stamps.append(time.perf_counter())
        log = server.log_path.read_text()
    finally:
        server.stop()
    forwards = [step["forward"] for step in decode_steps(log)]
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"tok_s": rate, "ms_per_token": 1000 / rate,
            "forward_ms_median": statistics.median(forwards[-n // 2:]) if forwards else None}


def main(argv: list[str] | None = None) -> int:
    from benchmarks import machine
    from fixtures.bundled_model import ensure_default_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/decode.json"))
    args = ap.parse_args(argv)
    models = ensure_default_models()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = Setup(hf=models.hf, mlx=models.mlx, gguf=None, device=args.device, max_model_len=2048,
                  max_num_seqs=8, kv_cache_gib=args.kv_cache_gib, log_dir=args.out.parent / "logs")
    bw = bandwidth_gbs()
    rows = []
    for dtype in args.dtype:
        mlx_tps, weight_bytes = mlx_lm_rate(models.mlx, dtype, args.tokens)
        ceiling = bw * 1e9 / weight_bytes
        plugin = plugin_rate(setup, dtype, args.tokens)
        rows.append({"dtype": dtype, "weight_bytes": weight_bytes, "bandwidth_gbs": bw,
                     "ceiling_tok_s": ceiling, "mlx_lm_tok_s": mlx_tps, "plugin": plugin,
                     "plugin_vs_mlx_lm": plugin["tok_s"] / mlx_tps,
                     "plugin_of_ceiling": plugin["tok_s"] / ceiling, "mlx_lm_of_ceiling": mlx_tps / ceiling})
        print(json.dumps(rows[-1]), flush=True)
    print("| dtype | weights MiB | ceiling tok/s | mlx_lm tok/s (of ceiling) | plugin tok/s (of ceiling) | "
          "plugin/mlx_lm | plugin ms/token: forward / total |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p = r["plugin"]
        fwd = f"{p['forward_ms_median']:.2f}" if p["forward_ms_median"] else "n/a"
        print(f"| {r['dtype']} | {r['weight_bytes'] / 2**20:.0f} | {r['ceiling_tok_s']:.0f} | "
              f"{r['mlx_lm_tok_s']:.0f} ({r['mlx_lm_of_ceiling']:.1%}) | {p['tok_s']:.0f} "
              f"({r['plugin_of_ceiling']:.1%}) | {r['plugin_vs_mlx_lm']:.2f} | {fwd} / {p['ms_per_token']:.2f} |")
    args.out.write_text(json.dumps({"machine": machine.describe(), "versions": machine.versions(),
                                    "bandwidth_gbs": bw, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
