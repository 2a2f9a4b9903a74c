"""What n-gram speculative decoding buys one stream on a repetitive (code-editing) workload.

    python -m benchmarks.investigations.ngram_drafts [--model DIR] [--dtype float32] [--device cpu]
        [--tokens 192] [--draft-tokens 4] [--rounds 2] [--out results.json]

Two ``vllm serve`` processes on the same checkpoint, one after the other: plain, and with
``--speculative-config '{"method": "ngram", ...}'``. Each gets the same greedy completions, one at
a time: source code followed by an instruction to write it out again with a change, which a
model mostly copies (what an agent editing a file asks for). Reported per server: output tok/s
(completion tokens / wall time of the request), and for the drafting one vLLM's own counters:
drafted and accepted tokens, acceptance rate, and mean tokens per verifying step. The tokens of
both servers are compared (n-gram drafts must not change greedy output). Default model: the
bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from benchmarks import machine
from benchmarks.server import ServerProcess, free_port, vllm_serve_command

CODE = '''def summarize(orders):
    total = 0
    count = 0
    largest = None
    for order in orders:
        total += order.amount
        count += 1
        if largest is None or order.amount > largest.amount:
            largest = order
    average = total / count if count else 0
    return {"total": total, "count": count, "average": average, "largest": largest}


def by_customer(orders):
    groups = {}
    for order in orders:
        groups.setdefault(order.customer, []).append(order)
    return {customer: summarize(items) for customer, items in groups.items()}
'''
EDITS = [
    "# The same code with the variable `total` renamed to `amount_sum`:\n",
    "# The same code with type hints added to every function:\n",
    "# The same code, with a docstring for each function:\n",
]


def _metrics(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:spec_decode_"):
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def run(model: Path, args: list[str], env: dict[str, str], tokens: int, rounds: int, name: str,
        log_dir: Path) -> dict:
    port = free_port()
    srv = ServerProcess(vllm_serve_command(model, port, args), port, log_dir / f"{name}-{port}.log", env=env)
    srv.start(timeout=600)
    try:
        body = {"model": str(model), "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        httpx.post(f"{srv.base}/v1/completions", json={**body, "prompt": CODE, "max_tokens": 8}, timeout=600)
        before = _metrics(srv.base)
        rates, outputs = [], []
        for _ in range(rounds):
            for edit in EDITS:
                t0 = time.perf_counter()
                r = httpx.post(f"{srv.base}/v1/completions", json={**body, "prompt": CODE + "\n" + edit},
                               timeout=600)
                wall = time.perf_counter() - t0
                r.raise_for_status()
                ids = r.json()["choices"][0]["token_ids"]
                rates.append(len(ids) / wall)
                outputs.append(ids)
        after = _metrics(srv.base)
    finally:
        srv.stop()
    counts = {k.removeprefix("vllm:spec_decode_").removesuffix("_total"): after.get(k, 0.0) - before.get(k, 0.0)
              for k in after}
    result = {"server": name, "tok_s_per_request": [round(x, 1) for x in rates],
              "median_tok_s": round(statistics.median(rates), 2), "outputs": outputs}
    drafted, accepted, drafts = counts.get("num_draft_tokens", 0), counts.get("num_accepted_tokens", 0), counts.get("num_drafts", 0)
    if drafted:
        result.update(drafted_tokens=drafted, accepted_tokens=accepted,
                      acceptance_rate=round(accepted / drafted, 3),
                      mean_tokens_per_verifying_step=round(1 + accepted / drafts, 2) if drafts else None)
    return result


def main(argv: list[str] | None = None) -> int:
    from fixtures.bundled_model import ensure_default_models

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--tokens", type=int, default=192)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/ngram_drafts.json"))
    a = ap.parse_args(argv)
    model = a.model or ensure_default_models().hf
    base = ["--dtype", a.dtype, "--max-model-len", "2048", "--max-num-seqs", "4", "--seed", "0",
            "--kv-cache-memory-bytes", str(1 << 30)]
    ngram = {"method": "ngram", "num_speculative_tokens": a.draft_tokens, "prompt_lookup_max": 4,
             "prompt_lookup_min": 2}
    env = {"VLLM_MLX_DEVICE": a.device}
    log_dir = a.out.parent / "logs"
    report = {"machine": machine.describe(), "model": str(model), "dtype": a.dtype, "device": a.device,
              "tokens": a.tokens, "ngram": ngram, "servers": []}
    for name, extra in (("plain", []), ("ngram", ["--speculative-config", json.dumps(ngram)])):
        report["servers"].append(run(model, base + extra, env, a.tokens, a.rounds, name, log_dir))
        r = report["servers"][-1]
        print(f"{name}: median {r['median_tok_s']} tok/s per request "
              + (f"(acceptance {r['acceptance_rate']}, {r['mean_tokens_per_verifying_step']} tokens per "
                 "verifying step)" if "acceptance_rate" in r else ""), flush=True)
    plain, spec = report["servers"]
    report["same_tokens"] = plain["outputs"] == spec["outputs"]
    report["speedup"] = round(spec["median_tok_s"] / plain["median_tok_s"], 2)
    print(f"speed-up {report['speedup']}x, same greedy tokens: {report['same_tokens']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
