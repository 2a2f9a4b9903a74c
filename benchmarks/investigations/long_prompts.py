"""Load test: long prompts from many concurrent clients at once, on a random-weight Llama checkpoint.

    python -m benchmarks.investigations.long_prompts [--shape llama-1b|llama-8b] [--checkpoint-dir DIR]
        [--scenario CxP@L ...] [--clients 16 --prompt-tokens 6000 --max-model-len 8192]
        [--max-tokens 128] [--dtype bfloat16] [--max-num-seqs 64] [--kv-cache-memory-bytes B]
        [--max-num-batched-tokens N] [--server-args "..."] [--out results.json]

The checkpoint is built once (cached in ``--checkpoint-dir``, default /tmp/vllm-metal-long/SHAPE):
HF safetensors, bf16, random weights (normal x 0.02, built with MLX so it is quick on a GPU), shaped
like Llama-3.2-1B (``llama-8b``: like Llama-3.1-8B) but with the bundled SmolLM2 tokenizer and its
vocabulary (49152), whose files are copied in. mlx-lm loads it (strict) before it is published.

Each scenario ``CxP@L`` (``--scenario``, repeatable; default from --clients/--prompt-tokens/
--max-model-len) starts its own ``vllm serve CHECKPOINT --dtype D --max-model-len L --max-num-seqs 64
--no-enable-prefix-caching [...]`` (``VLLM_MLX_DEVICE`` from the environment), then C clients each
send ONE non-streamed completions request at the same moment: P random token ids (distinct per
client, seeded), ``max_tokens`` 128, greedy, ``ignore_eos``. Per request: HTTP status, latency,
completion tokens, error text. Device memory is sampled every 0.2 s during the load (``nvidia-smi``
memory.used; without it, the engine process's RSS) and its peak recorded, with the memory before the
server, after its start-up and after the load, and the server log's KV-budget, activation and
buffer-cache lines. Afterwards /health must still answer 200 and one short request must succeed.

The JSON (``--out``, rewritten after every scenario) holds all of it; failed requests or a server
that does not start are recorded there and the exit code stays 0 (non-zero: the harness broke).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks import machine
from benchmarks.load import percentile
from benchmarks.server import StartError, vllm_serve_command
from benchmarks.systems import Server, Setup

SERVED_NAME = "llama-random"
MARKER = ".long-prompts-checkpoint.json"
FORMAT_VERSION = 1
SHARD_BYTES = 4 * 2**30
TOKEN_RANGE = (1000, 40000)  # plain BPE pieces of the SmolLM2 vocabulary: no special tokens
LOG_PATTERNS = ("vllm-metal: KV budget", "activations", "buffer cache",
                "KV cache size", "Maximum concurrency", "Chunked prefill")
_LLAMA_COMMON = {"rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
                 "tie_word_embeddings": True, **_LLAMA_COMMON},
    "llama-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
                 "tie_word_embeddings": False, **_LLAMA_COMMON},
    # A Qwen3-0.6B-sized Llama (~330M parameters): big enough that a CPU step is not all host work,
    # small enough to serve on a 2-core machine (tensor parallelism's cost on the CPU).
    "llama-300m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2816,
                   "tie_word_embeddings": True, **_LLAMA_COMMON},
    # For testing the harness on a CPU in seconds (hidden from --help).
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 64, "intermediate_size": 256,
             "tie_word_embeddings": True, **_LLAMA_COMMON},
}


# -- the checkpoint ---------------------------------------------------------------------------

def _tensors(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama parameter names and shapes (norms included; no lm_head when tied)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def _shards(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of at most SHARD_BYTES (bf16), as HF checkpoints are split."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _key(shape_name: str, vocab_size: int, seed: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "shape": shape_name, **SHAPES[shape_name],
            "vocab_size": vocab_size, "seed": seed, "dtype": "bfloat16"}


def cached_checkpoint(out: Path, shape_name: str, seed: int) -> bool:
    """Whether ``out`` already holds this shape's checkpoint (the marker is written last)."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return {k: v for k, v in marker.items() if k != "vocab_size"} == \
        {k: v for k, v in _key(shape_name, 0, seed).items() if k != "vocab_size"}


def build_checkpoint(out: Path, shape_name: str, seed: int) -> dict[str, Any]:
    """Write the random checkpoint to ``out`` (via a temporary directory renamed into place), then
    load it with mlx-lm (strict: every name and shape) and run a few tokens through it."""
    import mlx.core as mx

    from fixtures.bundled_model import ensure_default_models

    if os.environ.get("VLLM_MLX_DEVICE") == "cpu":
        mx.set_default_device(mx.cpu)
    if out.exists() and not (out / MARKER).exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not a checkpoint this benchmark built; pick another "
                         "--checkpoint-dir or remove it")
    t0 = time.perf_counter()
    tok_dir = ensure_default_models().hf
    src = json.loads((tok_dir / "config.json").read_text())
    key = _key(shape_name, int(src["vocab_size"]), seed)
    cfg = {k: v for k, v in key.items() if k not in ("format", "shape", "seed", "dtype")}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02, "use_cache": True,
        **cfg, "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        "torch_dtype": "bfloat16", "dtype": "bfloat16",
        "bos_token_id": src.get("bos_token_id"), "eos_token_id": src.get("eos_token_id"),
        "pad_token_id": src.get("pad_token_id"),
    }
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.random.seed(seed)
    shards = _shards(_tensors(cfg))
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                arrays[name] = mx.ones(shape, dtype=mx.bfloat16)
            else:
                arrays[name] = (mx.random.normal(shape) * 0.02).astype(mx.bfloat16)
            mx.eval(arrays[name])
            weight_map[name] = fname
            total += arrays[name].nbytes
        mx.save_safetensors(str(tmp / fname), arrays, metadata={"format": "pt"})
        del arrays
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in tok_dir.iterdir():  # tokenizer.json, tokenizer_config.json, special tokens, generation
        if f.is_file() and not f.name.startswith(".") and f.name != "config.json" \
                and ".safetensors" not in f.name:
            shutil.copy2(f, tmp / f.name)
    tok_cfg_path = tmp / "tokenizer_config.json"
    if tok_cfg_path.exists():  # SmolLM2's says 8192; this checkpoint takes the config's length
        tok_cfg = json.loads(tok_cfg_path.read_text())
        tok_cfg["model_max_length"] = cfg["max_position_embeddings"]
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    build_s = time.perf_counter() - t0

    from mlx_lm.utils import load_model

    model, _ = load_model(tmp, lazy=True, strict=True)
    logits = model(mx.array([[1000, 2000, 3000, 4000]]))
    mx.eval(logits)
    if tuple(logits.shape) != (1, 4, cfg["vocab_size"]) or not bool(mx.all(mx.isfinite(logits)).item()):
        raise RuntimeError(f"mlx-lm forward of the new checkpoint gave {logits.shape}, or non-finite logits")
    del model, logits
    (tmp / MARKER).write_text(json.dumps(key, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return {"built_s": round(build_s, 1), "verified_s": round(time.perf_counter() - t0 - build_s, 1),
            "weight_bytes": total, "shards": len(shards), "tokenizer_from": str(tok_dir),
            "mlx_device": str(mx.default_device())}


def ensure_checkpoint(out: Path, shape_name: str, seed: int) -> dict[str, Any]:
    """Reuse the cached checkpoint, else build it in a child process, so that this process never
    opens the GPU (its memory would count in nvidia-smi's readings)."""
    if cached_checkpoint(out, shape_name, seed):
        return {"cached": True}
    cmd = [sys.executable, "-m", "benchmarks.investigations.long_prompts", "--build-only", "--shape", shape_name,
           "--checkpoint-dir", str(out), "--seed", str(seed)]
    print(f"building the {shape_name} checkpoint in {out} ...", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the checkpoint failed (exit {done.returncode}): {done.stdout[-2000:]}")
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  built in {facts['built_s']} s, mlx-lm loaded it in {facts['verified_s']} s", flush=True)
    return {"cached": False, **facts}


# -- memory -----------------------------------------------------------------------------------

class MemoryProbe:
    """Device memory in MiB: ``nvidia-smi`` memory.used of the GPU MLX uses, else the RSS of the
    server's engine process (``EngineCore``; the whole process tree if there is none)."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self.gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
        self.nvidia = shutil.which("nvidia-smi") is not None and self._nvidia() is not None
        self.last_rss_source = ""

    @property
    def source(self) -> str:
        if self.nvidia:
            return f"nvidia-smi memory.used, GPU {self.gpu}"
        return f"RSS from /proc: {self.last_rss_source or 'engine process'}"

    def _nvidia(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "-i", self.gpu, "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _rss(self) -> float | None:
        import psutil

        if self.server_pid is None:
            return None
        try:
            root = psutil.Process(self.server_pid)
            tree = [root, *root.children(recursive=True)]
            engines = [p for p in tree if "EngineCore" in p.name() or
                       any("EngineCore" in a for a in p.cmdline()[:1])]
            if engines:
                self.last_rss_source = f"EngineCore pid {engines[0].pid}"
                return engines[0].memory_info().rss / 2**20
            self.last_rss_source = "server process tree (no EngineCore process found)"
            return sum(p.memory_info().rss for p in tree) / 2**20
        except psutil.Error:
            return None

    def read(self) -> float | None:
        return self._nvidia() if self.nvidia else self._rss()


class Sampler:
    """Reads a probe every ``interval`` seconds on a thread, between start() and stop()."""

    def __init__(self, probe: MemoryProbe, interval: float = 0.2):
        self.probe, self.interval = probe, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            mib = self.probe.read()
            if mib is not None:
                self.samples.append((round(time.monotonic() - t0, 2), mib))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the server and the load -------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    clients: int
    prompt_tokens: int
    max_model_len: int

    @property
    def name(self) -> str:
        return f"{self.clients}x{self.prompt_tokens}@{self.max_model_len}"

    @staticmethod
    def parse(spec: str) -> Scenario:
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*@\s*(\d+)\s*", spec)
        if not m:
            raise argparse.ArgumentTypeError(f"scenario {spec!r} is not CLIENTSxPROMPT_TOKENS@MAX_MODEL_LEN")
        return Scenario(*map(int, m.groups()))


class LongServe(Server):
    """``vllm serve`` on the random checkpoint; the plugin's device comes from the environment."""

    def __init__(self, setup: Setup, args: argparse.Namespace, scenario: Scenario):
        self.name = f"long-{scenario.name}"
        self.args = args
        super().__init__(setup)

    @property
    def model_id(self) -> str:
        return SERVED_NAME

    def command(self) -> list[str]:
        a, s = self.args, self.setup
        cmd = vllm_serve_command(s.hf, self.port, [
            "--served-model-name", SERVED_NAME, "--dtype", a.dtype, "--max-model-len", str(s.max_model_len),
            "--max-num-seqs", str(s.max_num_seqs), "--seed", "0", "--no-enable-prefix-caching"])
        if a.kv_cache_memory_bytes:
            cmd += ["--kv-cache-memory-bytes", a.kv_cache_memory_bytes]
        if a.max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
        return cmd + shlex.split(a.server_args)


def prompts_for(scenario: Scenario, seed: int) -> list[list[int]]:
    rng = random.Random(f"{seed}-{scenario.name}")
    return [[rng.randrange(*TOKEN_RANGE) for _ in range(scenario.prompt_tokens)]
            for _ in range(scenario.clients)]


def _body(prompt: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": False}


async def _request(client: httpx.AsyncClient, url: str, body: dict[str, Any], t_load: float,
                   index: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"client": index, "status": None, "latency_s": None,
                           "completion_tokens": 0, "prompt_tokens": None, "finish_reason": None, "error": ""}
    try:
        r = await client.post(url, json=body)
    except httpx.HTTPError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    else:
        rec["status"] = r.status_code
        if r.status_code == 200:
            try:
                data = r.json()
                rec["completion_tokens"] = int(data["usage"]["completion_tokens"])
                rec["prompt_tokens"] = int(data["usage"]["prompt_tokens"])
                rec["finish_reason"] = data["choices"][0].get("finish_reason")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                rec["error"] = f"unreadable 200 response ({e!r}): {r.text[:500]}"
        else:
            rec["error"] = r.text[:2000]
    t1 = time.perf_counter()
    rec["latency_s"], rec["finished_at_s"] = round(t1 - t0, 3), round(t1 - t_load, 3)
    return rec


async def run_load(base_url: str, prompts: list[list[int]], max_tokens: int,
                   timeout: float) -> tuple[list[dict[str, Any]], float]:
    """All prompts at once, one request per client; returns the records and the wall time."""
    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
    url = f"{base_url}/v1/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        t0 = time.perf_counter()
        recs = await asyncio.gather(*(_request(client, url, _body(p, max_tokens), t0, i)
                                      for i, p in enumerate(prompts)))
        return list(recs), time.perf_counter() - t0


def log_lines(path: Path, patterns: tuple[str, ...]) -> list[str]:
    """The log's lines containing any of ``patterns``, each once, in order."""
    if not path.exists():
        return []
    seen: dict[str, None] = {}
    for line in path.read_text(errors="replace").splitlines():
        if any(p in line for p in patterns):
            seen.setdefault(line.strip(), None)
    return list(seen)


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} MiB"


def run_scenario(args: argparse.Namespace, scenario: Scenario, checkpoint: Path, log_dir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"scenario": scenario.name, "clients": scenario.clients,
                           "prompt_tokens": scenario.prompt_tokens, "max_model_len": scenario.max_model_len,
                           "max_tokens": args.max_tokens}
    if scenario.prompt_tokens + args.max_tokens > scenario.max_model_len:
        res["warning"] = (f"prompt {scenario.prompt_tokens} + max_tokens {args.max_tokens} exceeds "
                          f"max-model-len {scenario.max_model_len}: the server should reject the requests")
        print(f"  warning: {res['warning']}", flush=True)
    setup = Setup(hf=checkpoint, mlx=checkpoint, gguf=None, device=os.environ.get("VLLM_MLX_DEVICE", "gpu"),
                  max_model_len=scenario.max_model_len, max_num_seqs=args.max_num_seqs, kv_cache_gib=0.0,
                  log_dir=log_dir)
    server = LongServe(setup, args, scenario)
    res["command"] = " ".join(shlex.quote(c) for c in server.command())
    res["log"] = str(server.log_path)
    idle = MemoryProbe()
    res["memory"] = {"before_server_mib": idle.read()}
    try:
        try:
            server.start(timeout=args.startup_timeout)
        except StartError as e:
            res["start_error"] = str(e)
            res["log_lines"] = log_lines(server.log_path, LOG_PATTERNS)
            print(f"  server did not start: {str(e).splitlines()[0]}", flush=True)
            return res
        res["startup_s"] = round(server.startup_s, 1)
        probe = MemoryProbe(server.proc.pid if server.proc else None)
        time.sleep(1.0)
        mem = res["memory"]
        mem["after_startup_mib"] = probe.read()
        prompts = prompts_for(scenario, args.seed)
        with Sampler(probe, args.sample_interval) as sampler:
            recs, wall = asyncio.run(run_load(server.base_url, prompts, args.max_tokens, args.request_timeout))
        values = [mib for _, mib in sampler.samples]
        mem["source"] = probe.source
        mem["peak_during_load_mib"] = max(values) if values else None
        if values and mem["after_startup_mib"] is not None:
            mem["peak_over_startup_mib"] = max(values) - mem["after_startup_mib"]
        mem["samples"] = len(values)
        mem["interval_s"] = args.sample_interval
        mem["timeline_mib"] = sampler.samples[:: max(1, len(sampler.samples) // 600)]
        mem["after_load_mib"] = probe.read()

        ok = [r for r in recs if r["status"] == 200 and not r["error"]]
        lat = [r["latency_s"] for r in ok]
        tokens = sum(r["completion_tokens"] for r in ok)
        res["status_counts"] = dict(Counter(str(r["status"]) if r["status"] is not None else "no response"
                                            for r in recs))
        res["summary"] = {
            "ok": len(ok), "failed": len(recs) - len(ok), "wall_s": round(wall, 2),
            "latency_p50_s": percentile(lat, 50), "latency_max_s": max(lat) if lat else None,
            "completion_tokens": tokens, "output_tok_s": tokens / wall if wall > 0 else None,
            "short_completions": sum(r["completion_tokens"] != args.max_tokens for r in ok),
            "prompt_token_mismatches": sum(r["prompt_tokens"] != scenario.prompt_tokens for r in ok),
        }
        res["requests"] = recs
        res["server_alive_after_load"] = server.alive()
        try:
            res["health_after"] = httpx.get(f"{server.base_url}/health", timeout=30).status_code
        except httpx.HTTPError as e:
            res["health_after"] = f"{type(e).__name__}: {e}"
        short = [random.Random(args.seed).randrange(*TOKEN_RANGE) for _ in range(16)]
        after, _ = asyncio.run(run_load(server.base_url, [short], 8, 300.0))
        res["short_request_after"] = after[0]
        res["log_lines"] = log_lines(server.log_path, LOG_PATTERNS)
        if res["summary"]["failed"] or not res["server_alive_after_load"] or after[0]["status"] != 200:
            res["log_errors"] = log_lines(server.log_path, ("ERROR", "Error", "Traceback", "out of memory"))[:40]
            res["log_tail"] = server.log_tail(40)
    finally:
        server.stop()
    return res


def summary_lines(res: dict[str, Any]) -> list[str]:
    if "start_error" in res:
        return [f"{res['scenario']}: server did not start: {res['start_error'].splitlines()[0]}"]
    s, m = res["summary"], res["memory"]
    lat = lambda x: "n/a" if x is None or x != x else f"{x:.1f} s"  # noqa: E731
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(res["status_counts"].items()))
    short = res["short_request_after"]
    lines = [
        f"{res['scenario']}: {s['ok']}/{s['ok'] + s['failed']} ok ({statuses}); wall {s['wall_s']:.1f} s, "
        f"latency p50 {lat(s['latency_p50_s'])} max {lat(s['latency_max_s'])}; {s['completion_tokens']} "
        f"completion tokens ({s['short_completions']} requests short of max_tokens)",
        f"  memory ({m.get('source')}): before server {_mib(m['before_server_mib'])}, after start-up "
        f"{_mib(m.get('after_startup_mib'))}, peak during load {_mib(m.get('peak_during_load_mib'))}, "
        f"after load {_mib(m.get('after_load_mib'))}",
        f"  after the load: server {'alive' if res['server_alive_after_load'] else 'DEAD'}, /health "
        f"{res['health_after']}, short request {short['status']}"
        + (f" ({short['error'][:200]})" if short["error"] else ""),
    ]
    lines += [f"  log: {line}" for line in res["log_lines"]]
    errors = Counter(r["error"][:200] for r in res["requests"] if r["error"])
    lines += [f"  error x{n}: {e}" for e, n in errors.most_common(3)]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="llama-1b", metavar="{llama-1b,llama-8b}",
                    help="llama-1b (Llama-3.2-1B's shape) or llama-8b (Llama-3.1-8B's)")
    ap.add_argument("--checkpoint-dir", type=Path, default=None,
                    help="where the checkpoint is built once and reused (default /tmp/vllm-metal-long/SHAPE)")
    ap.add_argument("--scenario", type=Scenario.parse, action="append", default=[],
                    help="CLIENTSxPROMPT_TOKENS@MAX_MODEL_LEN, e.g. 16x6000@8192; repeatable, one server each")
    ap.add_argument("--clients", type=int, default=16, help="without --scenario")
    ap.add_argument("--prompt-tokens", type=int, default=6000, help="without --scenario")
    ap.add_argument("--max-model-len", type=int, default=8192, help="without --scenario")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", help="the server's --dtype (MLX's CPU backend: float32)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache-memory-bytes", default=None, help="passed to vllm serve (e.g. 20G)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--server-args", default="", help="more vllm serve arguments, one shell-quoted string")
    ap.add_argument("--seed", type=int, default=0, help="of the weights and of the prompts")
    ap.add_argument("--request-timeout", type=float, default=3600.0)
    ap.add_argument("--startup-timeout", type=float, default=1200.0)
    ap.add_argument("--sample-interval", type=float, default=0.2, help="seconds between memory samples")
    ap.add_argument("--out", type=Path, default=Path("/tmp/vllm-metal-bench/long_prompts.json"))
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    checkpoint = args.checkpoint_dir or Path("/tmp/vllm-metal-long") / args.shape

    if args.build_only:  # the child process of ensure_checkpoint: its last stdout line is JSON
        from contextlib import redirect_stdout

        with redirect_stdout(sys.stderr):
            facts = build_checkpoint(checkpoint, args.shape, args.seed)
        print(json.dumps(facts))
        return 0

    scenarios = args.scenario or [Scenario(args.clients, args.prompt_tokens, args.max_model_len)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = args.out.parent / "logs"
    build = ensure_checkpoint(checkpoint, args.shape, args.seed)
    config = {
        "shape": args.shape, **SHAPES[args.shape], "checkpoint": str(checkpoint),
        "vocab_size": json.loads((checkpoint / "config.json").read_text())["vocab_size"],
        "checkpoint_build": build, "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
        "kv_cache_memory_bytes": args.kv_cache_memory_bytes, "max_num_batched_tokens": args.max_num_batched_tokens,
        "server_args": args.server_args, "prefix_caching": False, "max_tokens": args.max_tokens,
        "seed": args.seed, "token_id_range": list(TOKEN_RANGE), "request_timeout_s": args.request_timeout,
        "VLLM_MLX_DEVICE": os.environ.get("VLLM_MLX_DEVICE", "(unset: the plugin's default, gpu)"),
        "scenarios": [s.name for s in scenarios],
    }
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "command": "python -m benchmarks.investigations.long_prompts " + " ".join(
                shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))}
    doc: dict[str, Any] = {"meta": meta, "config": config, "scenarios": []}
    for scenario in scenarios:
        print(f"scenario {scenario.name}: {scenario.clients} clients x {scenario.prompt_tokens} prompt "
              f"tokens, max-model-len {scenario.max_model_len}", flush=True)
        res = run_scenario(args, scenario, checkpoint, log_dir)
        doc["scenarios"].append(res)
        args.out.write_text(json.dumps(doc, indent=1))
        for line in summary_lines(res):
            print(line, flush=True)
    # After the servers: describing the machine imports MLX, which may open the GPU.
    meta["machine"], meta["versions"] = machine.describe(), machine.versions()
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
