"""Linear layers' products at T rows: 4-bit ``quantized_matmul``, the 4-bit kernel and bf16, on MLX's device.

    python -m benchmarks.investigations.quantized_matmul [--shapes 14336:4096 ...] [--rows 1 8 32 512]
        [--row-tiles 1 2 4] [--prefetch 1 2 4] [--out results.json]

The packed step gives a layer's product one ``(1, T, K)`` operand with T = the step's tokens (1 per
decoding sequence, a chunk's length while prefilling). Per shape (N:K, default: an 8B Llama's
q/o, k/v, gate/up and down projections and a 49152-token head) and T: a 4-bit group-64
``quantized_matmul`` (the weight as ``mlx_lm.convert -q`` stores it), ``quant_kernel.q4_matmul``
(where MLX computes on CUDA; with ``--row-tiles`` and ``--prefetch``, also at each forced
threadgroup layout and prefetch depth), the same product on
the bf16 weight, and ``dequantize`` then the bf16 product. Each is run 200 times in one evaluation
after 10 untimed runs, so a figure near the smallest ones is the per-kernel launch floor, not the
product. ``layer_ms`` adds up one 8B decoder layer (q, k, v, o, gate, up, down) per T and path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx

from vllm_metal import quant_kernel

LAYER_8B = {"4096:4096": 2, "1024:4096": 2, "14336:4096": 2, "4096:14336": 1}  # products per decoder layer


def _ms(f, x: mx.array, reps: int = 200) -> float:
    for _ in range(10):
        mx.eval(f(x))
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval([f(x) for _ in range(reps)])
    mx.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def _shape_rows(n: int, k: int, rows: list[int], row_tiles: list[int], prefetch: list[int], kernel: bool) -> list[dict]:
    w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    mx.eval(w, wq, scales, biases)
    out = []
    for t in rows:
        x = mx.random.normal((1, t, k)).astype(mx.bfloat16)
        row = {
            "T": t,
            "q4_ms": _ms(lambda a: mx.quantized_matmul(a, wq, scales, biases, transpose=True, group_size=64,
                                                      bits=4), x),
            "bf16_ms": _ms(lambda a: a @ w.T, x),
            "dequant_then_bf16_ms": _ms(lambda a: a @ mx.dequantize(wq, scales, biases, group_size=64,
                                                                    bits=4).T, x),
        }
        if kernel:
            row["kernel_ms"] = _ms(lambda a: quant_kernel.q4_matmul(a, wq, scales, biases, 64), x)
            for pf in prefetch:
                row[f"kernel_pf{pf}_ms"] = _ms(lambda a, pf=pf: quant_kernel.q4_matmul(a, wq, scales, biases, 64,
                                                                                      pf=pf), x)
            for wr in row_tiles:
                row[f"kernel_wr{wr}_ms"] = _ms(lambda a, wr=wr: quant_kernel.q4_matmul(a, wq, scales, biases, 64,
                                                                                      wr=wr), x)
        out.append({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()})
        print(n, k, out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=[*LAYER_8B, "49152:4096"], help="N:K of each layer")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--row-tiles", nargs="*", type=int, default=[], help="also the kernel at each forced WR")
    ap.add_argument("--prefetch", nargs="*", type=int, default=[], help="also the kernel at each forced PF")
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/quantized_matmul.json"))
    args = ap.parse_args(argv)

    kernel = quant_kernel.on_cuda()
    shapes = {s: _shape_rows(*map(int, s.split(":")), args.rows, args.row_tiles, args.prefetch, kernel) for s in args.shapes}
    layer = []
    if set(LAYER_8B) <= set(shapes):
        for i, t in enumerate(args.rows):
            layer.append({"T": t, **{f"{path}_ms": round(sum(c * shapes[s][i][f"{path}_ms"] for s, c in LAYER_8B.items()), 4)
                                     for path in ("q4", "bf16", "dequant_then_bf16", *(["kernel"] if kernel else []))}})
            print("8B layer", layer[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": str(mx.default_device()), "shapes": shapes, "layer_ms": layer},
                                   indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
