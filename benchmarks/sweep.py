"""Concurrency sweep: N concurrent streaming clients on a fixed prompt set, per level.

Default load generator: ``load.py`` (``--loadgen builtin``), the same client for every system.
vLLM's own ``vllm bench serve`` (``--loadgen vllm-bench``: ``--backend openai-chat``, custom JSONL
dataset, ``--max-concurrency N``, run in this process through its own argument parser so one import
serves every level) does not fit as the common generator in vLLM 0.32.0: its client strips each
network chunk before splitting SSE messages, so mlx_lm.server's ``: keepalive`` comments swallow
the data events that follow them (mlx-lm requests fail or arrive as one chunk), and it sends chat
content as a list of parts, which llama-cpp-python's chat template rejects. It stays available to
cross-check the vLLM systems. Both report output tok/s over the run's wall clock, mean and p99
TTFT and mean TPOT, under the same names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shlex
from pathlib import Path
from typing import Any

from benchmarks.load import run_clients, summarize
from benchmarks.systems import Server

CONCURRENCY = (1, 2, 4, 8, 16, 32)
KEYS = ("completed", "failed", "duration", "total_output_tokens", "output_throughput",
        "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms")


def num_prompts_for(concurrency: int, fixed: int | None, available: int) -> int:
    """Requests per level: ``fixed``, else 4 per client (at least 8), capped by the prompt set."""
    n = fixed if fixed else max(8, 4 * concurrency)
    return min(n, available)


def bench_argv(server: Server, dataset: Path, tokenizer: Path, output_len: int, concurrency: int,
               num_prompts: int, bias: dict[str, float]) -> list[str]:
    """Arguments of ``vllm bench serve`` for one level (same request body as the protocol)."""
    extra = {"max_tokens": output_len, "temperature": 0, "logit_bias": bias}
    return ["--backend", "openai-chat", "--base-url", server.base_url,
            "--endpoint", "/v1/chat/completions", "--model", server.model_id,
            "--tokenizer", str(tokenizer), "--dataset-name", "custom", "--dataset-path", str(dataset),
            "--skip-chat-template", "--disable-shuffle", "--custom-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--extra-body", json.dumps(extra, separators=(",", ":")),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "99",
            "--seed", "0", "--disable-tqdm"]


def command_line(argv: list[str]) -> str:
    return "vllm bench serve " + " ".join(shlex.quote(a) for a in argv)


def _vllm_bench(argv: list[str], log_path: Path) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print("$", command_line(argv), flush=True)
        result = main(args)
    out = {k: result.get(k) for k in KEYS}
    out["errors"] = [e for e in result.get("errors", []) if e][:5]
    return out


def run_sweep(server: Server, levels: list[int], prompts: list[str], dataset: Path,
              tokenizer: Path, output_len: int, fixed_prompts: int | None, bias: dict[str, float],
              loadgen: str, log_path: Path, log=print) -> dict[str, Any]:
    """``{str(concurrency): metrics}`` for one started server."""
    count_tokens = _token_counter(tokenizer)
    out: dict[str, Any] = {}
    for c in levels:
        if not server.alive():
            raise RuntimeError(f"server exited before concurrency {c}\n{server.log_tail()}")
        n = num_prompts_for(c, fixed_prompts, len(prompts))
        if loadgen == "vllm-bench":
            argv = bench_argv(server, dataset, tokenizer, output_len, c, n, bias)
            m = _vllm_bench(argv, log_path)
            m["command"] = command_line(argv)
        else:
            results, wall = asyncio.run(run_clients(server.base_url, server.model_id, prompts[:n],
                                                    output_len, c, bias, count_tokens))
            m = summarize(results, wall)
        m |= {"concurrency": c, "num_prompts": n}
        out[str(c)] = m
        log(f"  sweep c={c:>2}: {_fmt(m['output_throughput'])} tok/s, TTFT mean "
            f"{_fmt(m['mean_ttft_ms'])} ms p99 {_fmt(m['p99_ttft_ms'])} ms, TPOT "
            f"{_fmt(m['mean_tpot_ms'])} ms ({m['completed']}/{n} ok)")
    return out


def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def _token_counter(tokenizer: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
