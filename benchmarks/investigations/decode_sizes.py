"""Decode at the sizes people run: 1B and 8B Llama shapes in bf16 and 4-bit, 1 to 64 clients.

    python -m benchmarks.investigations.decode_sizes [--checkpoints llama-1b llama-8b llama-8b-q4]
        [--concurrency 1 8 32 64] [--one-step-ahead 1 0] [--mlx-lm-server 1 8] [--max-tokens 128]
        [--tensor-parallel-size 1 2] [--dequantize-rows auto] [--kv-in-place 1 0] [--quantized-kernel on off] [--dtype bfloat16] [--checkpoint-dir DIR] [--out results.json]

Checkpoints are built on the machine (random weights, the bundled SmolLM2 tokenizer, nothing
downloaded): ``llama-1b`` and ``llama-8b`` as ``long_prompts`` builds them (HF safetensors, bf16),
``llama-8b-q4`` as ``mlx_lm.convert -q`` (4-bit, group 64) makes it from ``llama-8b``;
``llama-300m`` (a Qwen3-0.6B-sized Llama) is for CPUs. Each runs
at its own dtype (bf16; the 4-bit one with bf16 scales and activations). ``qwen3_5-2b`` (and
``-q4``) is a Qwen3.5-shaped hybrid (``HYBRID_SHAPES``: Gated DeltaNet layers 3 : 1 attention),
built by transformers with random weights; its 4-bit copy is made by mlx-lm as ``mlx_lm.convert -q``
would, keeping transformers' config.

Per checkpoint: mlx-lm's own decode loop (``generate_step``, one stream, in a subprocess) and its
fraction of the device's copy bandwidth / weight bytes; then ``vllm serve --dtype bfloat16`` once
per ``--one-step-ahead`` setting (VLLM_METAL_ONE_STEP_AHEAD; and per ``--dequantize-rows``,
``--kv-in-place`` and ``--quantized-kernel`` value) and, with ``--mlx-lm-server``,
mlx_lm.server, each driven by ``benchmarks.load`` at every concurrency level: 2 x C streamed
chat requests from the sweep's prompt set (at least 4; after C untimed 8-token requests, so
first-use kernel compilation for that batch size is not timed), ``max_tokens`` output tokens each (special
tokens suppressed by ``logit_bias``, which both servers honour), greedy. Reported: output tok/s,
mean TTFT and TPOT, failures. The JSON (``--out``) is rewritten after every server.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.investigations.decode_roofline import bandwidth_gbs
from benchmarks.investigations.long_prompts import SHAPES, ensure_checkpoint
from benchmarks.load import run_clients, summarize
from benchmarks.prompts import eos_logit_bias, sweep_prompts
from benchmarks.server import vllm_serve_command
from benchmarks.systems import MlxLm, Server, Setup

CHECKPOINTS = {"llama-300m": ("llama-300m", False), "llama-1b": ("llama-1b", False), "llama-8b": ("llama-8b", False), "llama-8b-q4": ("llama-8b", True),
               "qwen3_5-2b": ("qwen3_5-2b", False), "qwen3_5-2b-q4": ("qwen3_5-2b", True),
               # for trying the harness on a CPU in seconds (hidden from --help)
               "tiny": ("tiny", False), "tiny-q4": ("tiny", True)}
SERVED_NAME = "llama-random"
# A Qwen3.5-shaped hybrid (Gated DeltaNet 3 : 1 attention), ~2B parameters with SmolLM2's vocabulary:
# transformers' Qwen3_5TextConfig layout, built by transformers (random init, bf16).
HYBRID_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3_5-2b": {"hidden_size": 2048, "num_hidden_layers": 24, "intermediate_size": 6144,
                   "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
                   "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                   "linear_num_key_heads": 16, "linear_num_value_heads": 16,
                   "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                                       "partial_rotary_factor": 0.25},
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 32768},
}


def build_hybrid(out: Path, shape: str, seed: int) -> None:
    """The ``HYBRID_SHAPES`` checkpoint (HF safetensors, bf16, SmolLM2's tokenizer) in ``out``."""
    if (out / "config.json").exists():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fixtures.bundled_model import ensure_default_models
    from fixtures.tiny import copy_tokenizer

    tok_dir = ensure_default_models().hf
    src = json.loads((tok_dir / "config.json").read_text())
    config = AutoConfig.for_model("qwen3_5_text", architectures=["Qwen3_5ForCausalLM"], vocab_size=src["vocab_size"],
                                  bos_token_id=src.get("bos_token_id"), eos_token_id=src.get("eos_token_id"),
                                  **HYBRID_SHAPES[shape])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.parent / f".{out.name}.tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    copy_tokenizer(tok_dir, tmp)
    tmp.rename(out)


def checkpoint(root: Path, name: str, seed: int) -> Path:
    """The checkpoint's directory, built if missing."""
    shape, quantized = CHECKPOINTS[name]
    base = root / shape
    if shape in HYBRID_SHAPES:
        build_hybrid(base, shape, seed)
    else:
        ensure_checkpoint(base, shape, seed)
    if not quantized:
        return base
    out = root / name
    if not (out / "config.json").exists() and shape in HYBRID_SHAPES:  # the config keeps transformers' layout
        from fixtures.tiny import quantize

        quantize(base, out, bits=4, group_size=64)
    elif not (out / "config.json").exists():
        from mlx_lm import convert

        convert(str(base), mlx_path=str(out), quantize=True, q_group_size=64, q_bits=4)
    return out


def mlx_lm_loop(model_dir: Path, tokens: int, dtype: str = "bfloat16") -> dict[str, Any]:
    """mlx-lm's ``generate_step`` rate at one stream, in its own process (its memory goes with it)."""
    code = ("import json, sys; from pathlib import Path; "
            "import vllm_metal; vllm_metal.register(); "  # MLX's CPU matmuls on the BLAS the servers get
            "from benchmarks.investigations.decode_roofline import mlx_lm_rate; "
            "tps, nbytes = mlx_lm_rate(Path(sys.argv[1]), sys.argv[3], int(sys.argv[2])); "
            "print(json.dumps({'tok_s': tps, 'weight_bytes': nbytes}))")
    done = subprocess.run([sys.executable, "-c", code, str(model_dir), str(tokens), dtype], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


class Plugin(Server):
    """``vllm serve`` on the checkpoint (bf16 unless told), one-step-ahead on or off, on
    ``tensor_parallel`` ranks."""

    def __init__(self, setup: Setup, one_step_ahead: str, tensor_parallel: int = 1, dtype: str = "bfloat16",
                 name: str | None = None, extra_env: dict[str, str] | None = None):
        self.name = name or f"vllm-metal-osa{one_step_ahead}" + (f"-tp{tensor_parallel}" if tensor_parallel > 1 else "")
        self.one_step_ahead = one_step_ahead
        self.tensor_parallel = tensor_parallel
        self.dtype = dtype
        self.extra_env = extra_env or {}
        super().__init__(setup)

    @property
    def model_id(self) -> str:
        return SERVED_NAME

    def command(self) -> list[str]:
        s = self.setup
        return vllm_serve_command(s.hf, self.port, [
            "--served-model-name", SERVED_NAME, "--dtype", self.dtype, "--max-model-len", str(s.max_model_len),
            "--max-num-seqs", str(s.max_num_seqs), "--seed", "0", "--no-enable-prefix-caching",
            "--kv-cache-memory-bytes", str(int(s.kv_cache_gib * 2**30)),
            "--tensor-parallel-size", str(self.tensor_parallel)])

    def env(self) -> dict[str, str]:
        return {"VLLM_MLX_DEVICE": self.setup.device, "VLLM_METAL_ONE_STEP_AHEAD": self.one_step_ahead,
                **self.extra_env}


def variants(settings: dict[str, tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """``Plugin`` keywords for every combination of the given env vars' values (``settings``: var ->
    (tag, values)); a var given more than one value is in the server's name as tag + value."""
    out = []
    names = list(settings)
    for values in itertools.product(*(settings[n][1] for n in names)):
        tags = [settings[n][0] + v for n, v in zip(names, values, strict=True) if len(settings[n][1]) > 1]
        keywords: dict[str, Any] = {"extra_env": dict(zip(names, values, strict=True))}
        if tags:
            keywords["name"] = "vllm-metal-" + "-".join(tags)
        out.append(keywords)
    return out


def sweep(server: Server, levels: list[int], max_tokens: int, bias: dict[str, float],
          warm_up: bool = True) -> list[dict[str, Any]]:
    """Each level: with ``warm_up``, first C short requests at once (MLX compiles kernels for a
    batch shape the first time it runs; that belongs to no level's figures), then the timed ones."""
    prompts = sweep_prompts()
    rows = []
    for c in levels:
        if warm_up:
            asyncio.run(run_clients(server.base_url, server.model_id, prompts[:c], 8, c, bias,
                                    count_tokens=lambda text: 0))
        n = max(4, 2 * c)
        batch = [prompts[i % len(prompts)] for i in range(n)]
        results, wall = asyncio.run(run_clients(server.base_url, server.model_id, batch, max_tokens, c, bias,
                                                count_tokens=lambda text: 0))
        rows.append({"concurrency": c, **summarize(results, wall)})
        r = rows[-1]
        print(f"  {server.name} c={c}: {r['output_throughput']:.0f} tok/s, TTFT {r['mean_ttft_ms']:.0f} ms, "
              f"TPOT {r['mean_tpot_ms']:.1f} ms, failed {r['failed']}", flush=True)
    return rows


def serve_and_sweep(server: Server, levels: list[int], max_tokens: int, bias: dict[str, float]) -> dict[str, Any]:
    server.start(timeout=900)
    try:
        sweep(server, [1], max_tokens, bias, warm_up=False)  # the first requests: buffers settle
        return {"server": server.name, "levels": sweep(server, levels, max_tokens, bias)}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", choices=list(CHECKPOINTS), default=["llama-1b", "llama-8b", "llama-8b-q4"],
                    metavar="{llama-300m,llama-1b,llama-8b,llama-8b-q4,qwen3_5-2b,qwen3_5-2b-q4}")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--one-step-ahead", nargs="+", choices=("1", "0"), default=["1", "0"])
    ap.add_argument("--mlx-lm-server", nargs="*", type=int, default=[], metavar="C",
                    help="also run mlx_lm.server at these concurrency levels")
    ap.add_argument("--tensor-parallel-size", nargs="+", type=int, default=[1], metavar="N",
                    help="serve the plugin on N ranks (each size in turn; --kv-cache-gib is per rank)")
    ap.add_argument("--dequantize-rows", nargs="+", default=["auto"], metavar="ROWS",
                    help="VLLM_METAL_DEQUANTIZE_ROWS of the plugin (each value in turn, e.g. 0 256)")
    ap.add_argument("--kv-in-place", nargs="+", choices=("1", "0"), default=["1"],
                    help="VLLM_METAL_KV_IN_PLACE of the plugin (each value in turn)")
    ap.add_argument("--quantized-kernel", nargs="+", choices=("auto", "on", "off"), default=["auto"],
                    help="VLLM_METAL_QUANTIZED_KERNEL of the plugin (each value in turn)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="the plugin's and mlx-lm's compute dtype (float32 on MLX's CPU backend)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--mlx-lm-tokens", type=int, default=256)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    ap.add_argument("--kv-cache-gib", type=float, default=16.0,
                    help="the plugin's KV cache (this process and mlx-lm's hold device memory too)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/vllm-metal-sizes"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/decode_sizes.json"))
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine.describe(), "versions": machine.versions(),
                              "command": " ".join(sys.argv), "bandwidth_gbs": bandwidth_gbs(), "checkpoints": []}
    for name in args.checkpoints:
        path = checkpoint(args.checkpoint_dir, name, args.seed)
        import mlx.core as mx

        mx.clear_cache()  # the checkpoint was built on the device; leave its memory to the servers
        loop = mlx_lm_loop(path, args.mlx_lm_tokens, args.dtype)
        ceiling = report["bandwidth_gbs"] * 1e9 / loop["weight_bytes"]
        shape = CHECKPOINTS[name][0]
        entry: dict[str, Any] = {"checkpoint": name, "shape": SHAPES.get(shape) or HYBRID_SHAPES[shape],
                                 "mlx_lm_loop": loop,
                                 "ceiling_tok_s": ceiling, "mlx_lm_of_ceiling": loop["tok_s"] / ceiling,
                                 "servers": []}
        print(f"{name}: mlx-lm loop {loop['tok_s']:.0f} tok/s ({loop['tok_s'] / ceiling:.0%} of "
              f"{ceiling:.0f}, {loop['weight_bytes'] / 2**30:.2f} GiB)", flush=True)
        report["checkpoints"].append(entry)
        setup = Setup(hf=path, mlx=path, gguf=None, device=args.device, max_model_len=2048,
                      max_num_seqs=max(args.concurrency), kv_cache_gib=args.kv_cache_gib, log_dir=args.out.parent / "logs")
        bias = eos_logit_bias(path)
        servers: list[tuple[Server, list[int]]] = [
            (Plugin(setup, o, tp, args.dtype, **keywords), args.concurrency)
            for tp in args.tensor_parallel_size for o in args.one_step_ahead
            for keywords in variants({"VLLM_METAL_DEQUANTIZE_ROWS": ("dq", args.dequantize_rows),
                                      "VLLM_METAL_KV_IN_PLACE": ("inplace", args.kv_in_place),
                                      "VLLM_METAL_QUANTIZED_KERNEL": ("qk", args.quantized_kernel)})]
        if args.mlx_lm_server:
            servers.append((MlxLm(setup), args.mlx_lm_server))
        for server, levels in servers:
            try:
                entry["servers"].append(serve_and_sweep(server, levels, args.max_tokens, bias))
            except Exception as exc:  # noqa: BLE001 - a server that fails is recorded, the rest still run
                entry["servers"].append({"server": server.name, "error": f"{type(exc).__name__}: {exc}",
                                         "log_tail": server.log_tail()})
                print(f"  {server.name}: {exc}", flush=True)
            args.out.write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    """Markdown: per checkpoint and server, tok/s (TPOT ms) at each level; one client vs mlx-lm's loop."""
    lines = ["| checkpoint | server | " + " | ".join(f"c={c}" for c in _levels(report)) + " | c=1 / mlx-lm loop |",
             "| --- | --- | " + " | ".join("---" for _ in _levels(report)) + " | --- |"]
    for entry in report["checkpoints"]:
        loop = entry["mlx_lm_loop"]["tok_s"]
        lines.append(f"| {entry['checkpoint']} | mlx-lm loop | {loop:.0f} | " + " | ".join(
            "" for _ in _levels(report)[1:]) + " | 1.00 |")
        for s in entry["servers"]:
            by = {r["concurrency"]: r for r in s.get("levels", [])}
            cells = [f"{by[c]['output_throughput']:.0f} ({by[c]['mean_tpot_ms']:.1f})" if c in by else ""
                     for c in _levels(report)]
            one = f"{by[1]['output_throughput'] / loop:.2f}" if 1 in by else ""
            lines.append(f"| {entry['checkpoint']} | {s['server']} | " + " | ".join(cells) + f" | {one} |")
    return "\n".join(lines)


def _levels(report: dict[str, Any]) -> list[int]:
    return sorted({r["concurrency"] for e in report["checkpoints"] for s in e["servers"]
                   for r in s.get("levels", [])}) or [1]


if __name__ == "__main__":
    raise SystemExit(main())
