"""One linear layer's product at T rows: 4-bit ``quantized_matmul`` against bf16, on MLX's device.

    python -m benchmarks.investigations.quantized_matmul [--k 4096] [--n 14336] [--rows 1 8 32 512]
        [--out results.json]

The packed step gives a layer's product one ``(1, T, K)`` operand with T = the step's tokens (1 per
decoding sequence, a chunk's length while prefilling). Per T: a 4-bit group-64 ``quantized_matmul``
(the weight as ``mlx_lm.convert -q`` stores it), the same product on the bf16 weight, and
``dequantize`` then the bf16 product (what a step could do instead where T is large). Each is run
200 times in one evaluation after 10 untimed runs, so a figure near the smallest ones is the
per-kernel launch floor, not the product.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx


def _ms(f, x: mx.array, reps: int = 200) -> float:
    for _ in range(10):
        mx.eval(f(x))
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval([f(x) for _ in range(reps)])
    mx.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/quantized_matmul.json"))
    args = ap.parse_args(argv)

    w = (mx.random.normal((args.n, args.k)) * 0.02).astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    mx.eval(w, wq, scales, biases)
    rows = []
    for t in args.rows:
        x = mx.random.normal((1, t, args.k)).astype(mx.bfloat16)
        row = {
            "T": t,
            "q4_ms": _ms(lambda a: mx.quantized_matmul(a, wq, scales, biases, transpose=True, group_size=64,
                                                      bits=4), x),
            "bf16_ms": _ms(lambda a: a @ w.T, x),
            "dequant_then_bf16_ms": _ms(lambda a: a @ mx.dequantize(wq, scales, biases, group_size=64,
                                                                    bits=4).T, x),
        }
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": str(mx.default_device()), "k": args.k, "n": args.n, "rows": rows},
                                   indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
