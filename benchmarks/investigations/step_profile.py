"""Where one batch-1 decode step's time goes, in process: the plugin's paged forward vs mlx-lm's own.

    python -m benchmarks.investigations.step_profile [--dtype float32] [--context 128] [--steps 64] [--device gpu]
        [--cache-limit-mib 256]

No server, no scheduler: the same loaded model runs (a) mlx-lm's ``KVCache`` loop, synchronous
per token as the plugin is, and (b) the plugin's paged step (``build_step_metadata`` +
``PagedLayerCache`` + one ``mx.eval``): on consecutive blocks (what one request gets from a fresh
pool: slice write, slice read) with a pool just big enough and with a large pool (a write that
copied the pool would show there), and on scattered blocks, which the store first swaps into
consecutive ones as the runner does (once, then one block every 16 steps). Each step is split into
host metadata, graph construction (Python + MLX op recording) and evaluation (device work + launch). Both loops
decode greedily from the same prompt; their tokens are compared, so a faster variant that
changed the answer would show.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np


def _median_ms(samples: list[float]) -> float:
    return round(1e3 * statistics.median(samples), 3)


def mlx_lm_loop(loaded, prompt: list[int], steps: int) -> dict:
    """mlx-lm's model and caches, one synchronous eval per token (what the plugin's step does)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(loaded.model)
    logits = loaded.model(mx.array(prompt)[None], cache=cache)[:, -1]
    token = int(mx.argmax(logits, axis=-1).item())
    build, run, tokens = [], [], [token]
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = loaded.model(mx.array([[token]]), cache=cache)[:, -1]
        t1 = time.perf_counter()
        mx.eval(logits)
        t2 = time.perf_counter()
        token = int(mx.argmax(logits, axis=-1).item())
        tokens.append(token)
        build.append(t1 - t0)
        run.append(t2 - t1)
    return {"build_ms": _median_ms(build), "eval_ms": _median_ms(run),
            "step_ms": _median_ms([a + b for a, b in zip(build, run, strict=True)]), "tokens": tokens}


def _ablated_cache(skip: str):
    """A ``PagedLayerCache`` with one part removed (wrong tokens; it only prices that part)."""
    from vllm_metal.attention import PagedLayerCache

    class Ablated(PagedLayerCache):
        def update_and_fetch(self, keys, values):
            self._kv = (keys, values)
            if skip == "scatter":
                return keys, values
            return super().update_and_fetch(keys, values)

        def attend(self, queries, scale, sinks):
            if skip != "gather":
                return super().attend(queries, scale, sinks)
            k, v = self._kv  # (1, KVH, 1, D): the step's own K/V, nothing gathered
            return mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale, mask=None, sinks=sinks)

    return Ablated


def paged_loop(loaded, prompt: list[int], steps: int, num_blocks: int, block_size: int = 16,
               skip: str | None = None, scattered: bool = False) -> dict:
    """The plugin's paged step: host metadata, one packed forward, one eval (as ``PagedBackend.forward``)."""
    from vllm_metal.attention import PagedKVStore, build_step_metadata

    store = PagedKVStore(loaded.specs, num_blocks, block_size, loaded.dtype)
    caches = store.layers if skip is None else [
        _ablated_cache(skip)(store, i, s.window) for i, s in enumerate(loaded.specs)
    ]
    need = -(-(len(prompt) + steps + 1) // block_size)
    ids = np.arange(1, num_blocks)  # what vLLM's allocator hands one request on a fresh pool
    table = (np.random.default_rng(0).permutation(ids) if scattered else ids)[:need].astype(np.int32)

    def step(ids: list[int], start: int) -> tuple[float, float, float, int]:
        t0 = time.perf_counter()
        tables = store.physical_tables([table])  # as the runner: placed consecutively
        store.steps = [build_step_metadata([len(ids)], [start], tables, block_size)]
        tokens = mx.array(np.asarray(ids, dtype=np.int32))
        rows = None if len(ids) == 1 else mx.array([len(ids) - 1])  # as the runner: decode selects none
        t1 = time.perf_counter()
        logits = loaded.logits(tokens, caches, rows)
        t2 = time.perf_counter()
        mx.eval(logits, store.arrays())
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, int(mx.argmax(logits, axis=-1).item())

    *_, token = step(prompt, 0)
    meta, build, run_t, tokens = [], [], [], [token]
    pos = len(prompt)
    for _ in range(steps):
        m, b, r, token = step([tokens[-1]], pos)
        pos += 1
        tokens.append(token)
        meta.append(m)
        build.append(b)
        run_t.append(r)
    return {"pool_mib": round(store.nbytes() / 2**20, 1), "meta_ms": _median_ms(meta),
            "build_ms": _median_ms(build), "eval_ms": _median_ms(run_t),
            "step_ms": _median_ms([a + b + c for a, b, c in zip(meta, build, run_t, strict=True)]),
            "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    import torch

    from fixtures.bundled_model import ensure_default_models
    from vllm_metal.attention import PagedKVStore
    from vllm_metal.device import select_device
    from vllm_metal.loader import load

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--large-pool-gib", type=float, default=1.0)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--cache-limit-mib", type=int, help="cap MLX's buffer cache as the worker does "
                    "under `vllm serve` (it logs the cap it sets); default: MLX's own limit")
    ap.add_argument("--ablations", action="store_true",
                    help="also time the paged step without its pool write, and without its gather")
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/step_profile.json"))
    args = ap.parse_args(argv)
    select_device(args.device)
    if args.cache_limit_mib is not None:
        mx.set_cache_limit(args.cache_limit_mib * 2**20)
    model_dir = ensure_default_models().mlx
    prompt = [int(x) for x in np.random.default_rng(1).integers(100, 40000, args.context)]
    results = {"device": str(mx.default_device()), "context": args.context, "steps": args.steps,
               "cache_limit_mib": args.cache_limit_mib}
    for dtype in args.dtype:
        loaded = load(model_dir, getattr(torch, dtype))
        per_block = PagedKVStore(loaded.specs, 1, 16, loaded.dtype).nbytes()
        small = -(-(args.context + args.steps + 1) // 16) + 2
        large = max(small, int(args.large_pool_gib * 2**30 // per_block))
        runs: list[tuple[str, object, dict]] = [
            ("mlx_lm", mlx_lm_loop, {}),
            ("paged_small_pool", paged_loop, {"num_blocks": small}),
            ("paged_large_pool", paged_loop, {"num_blocks": large}),
            ("paged_scattered_blocks", paged_loop, {"num_blocks": small, "scattered": True}),
        ]
        if args.ablations:  # what the K/V write and the context read cost (scattered blocks)
            runs += [(f"ablation_no_{part}", paged_loop, {"num_blocks": small, "skip": part, "scattered": True})
                     for part in ("scatter", "gather")]
        for label, fn, kwargs in runs:
            fn(loaded, prompt, args.steps, **kwargs)  # warm-up: kernels, buffer cache
            results[f"{dtype}/{label}"] = fn(loaded, prompt, args.steps, **kwargs)
        ref = results[f"{dtype}/mlx_lm"].pop("tokens")
        for label, *_ in runs[1:]:
            toks = results[f"{dtype}/{label}"].pop("tokens")
            if not label.startswith("ablation"):
                results[f"{dtype}/{label}"]["tokens_equal_mlx_lm"] = toks == ref
        for key in (k for k in results if k.startswith(dtype + "/")):
            print(key, results[key], flush=True)
        del loaded
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
