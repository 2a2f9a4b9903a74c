"""``--enable-lora``: adapters in mlx-lm's and PEFT's formats, several in one batch.

A live ``vllm serve --enable-lora --lora-modules ...`` on the bundled model with two random
adapters (one saved as mlx-lm saves them, one as PEFT does), chosen per request by model name:
greedy tokens equal mlx-lm's with the same adapter loaded (``mlx_lm.load(adapter_path=...)``),
alone and with the base model and both adapters in the same steps.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import pytest
from conftest import VllmServer, completion_tokens
from references import mlx_greedy, prompt_ids

N_NEW = 24
RANK = 8


def _random_adapter(hf_dir: Path, keys: list[str], layers: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module path -> (A (in, r), B (r, out)) on the last ``layers`` layers, strong enough to
    change greedy output."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    h, inter, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    dims = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, inter), "mlp.down_proj": (inter, h)}
    rng = np.random.default_rng(seed)
    return {f"model.layers.{i}.{k}": (rng.normal(0, dims[k][0] ** -0.5, (dims[k][0], RANK)).astype(np.float32),
                                      rng.normal(0, 0.05, (RANK, dims[k][1])).astype(np.float32))
            for i in range(n - layers, n) for k in keys}


def _save_mlx_lm(weights, keys: list[str], layers: int, scale: float, out: Path) -> Path:
    out.mkdir(parents=True)
    arrays = {}
    for module, (a, b) in weights.items():
        arrays[f"{module}.lora_a"], arrays[f"{module}.lora_b"] = mx.array(a), mx.array(b)
    mx.save_safetensors(str(out / "adapters.safetensors"), arrays)
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": layers,
        "lora_parameters": {"rank": RANK, "scale": scale, "dropout": 0.0, "keys": keys}}))
    return out


def _save_peft(weights, alpha: float, out: Path) -> Path:
    out.mkdir(parents=True)
    arrays = {}
    for module, (a, b) in weights.items():
        arrays[f"base_model.model.{module}.lora_A.weight"] = mx.array(a.T.copy())
        arrays[f"base_model.model.{module}.lora_B.weight"] = mx.array(b.T.copy())
    mx.save_safetensors(str(out / "adapter_model.safetensors"), arrays)
    targets = sorted({m.rsplit(".", 1)[1] for m in weights})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
        "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}))
    return out


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """name -> (the directory served, the mlx-lm directory mlx-lm loads for the reference)."""
    root = tmp_path_factory.mktemp("lora")
    keys_a = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    a = _save_mlx_lm(_random_adapter(models.hf, keys_a, 4, seed=0), keys_a, 4, 20.0, root / "mlx-a")
    keys_b = ["self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj"]
    b = _random_adapter(models.hf, keys_b, 6, seed=1)
    peft = _save_peft(b, alpha=2.0 * RANK, out=root / "peft-b")  # scale alpha / r = 2
    return {"mlxa": (a, a), "peftb": (peft, _save_mlx_lm(b, keys_b, 6, 2.0, root / "peft-b-as-mlx-lm"))}


@pytest.fixture(scope="module")
def lora_server(models, adapters):
    modules = [f"{name}={served}" for name, (served, _) in adapters.items()]
    srv = VllmServer(models.hf, ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8",
                                 "--kv-cache-memory-bytes", str(64 * 2**20), "--enable-lora",
                                 "--max-loras", "2", "--max-lora-rank", str(RANK),
                                 "--lora-modules", *modules], name="lora")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prompts(models):
    ids = prompt_ids(models.hf)
    return [ids[0], ids[3], ids[7]]


@pytest.fixture(scope="module")
def expected(models, adapters, prompts):
    """(model name, prompt index) -> mlx-lm's greedy tokens; the base model as ``None``."""
    out = {(None, i): mlx_greedy(models.mlx, p, N_NEW) for i, p in enumerate(prompts)}
    for name, (_, reference) in adapters.items():
        out.update({(name, i): mlx_greedy(models.mlx, p, N_NEW, adapter=reference) for i, p in enumerate(prompts)})
    return out


def _complete(srv: VllmServer, name: str | None, ids: list[int]) -> list[int]:
    return completion_tokens(srv, ids, N_NEW, **({"model": name} if name else {}))


def test_each_adapter_matches_mlx_lm_with_it(lora_server, prompts, expected):
    for (name, i), want in expected.items():
        assert _complete(lora_server, name, prompts[i]) == want, (name, i)
    for name in ("mlxa", "peftb"):  # the adapters change what the model says
        assert any(expected[(name, i)] != expected[(None, i)] for i in range(len(prompts))), name


def test_base_and_two_adapters_in_the_same_steps(lora_server, prompts, expected):
    jobs = list(expected) * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: _complete(lora_server, job[0], prompts[job[1]]), jobs))
    for job, tokens in zip(jobs, got, strict=True):
        assert tokens == expected[job], job


def test_adapters_are_listed_as_models(lora_server):
    listed = {m["id"] for m in httpx.get(f"{lora_server.url}/models", timeout=30).json()["data"]}
    assert {"mlxa", "peftb", lora_server.model} <= listed


@pytest.mark.parametrize(("config", "files", "needle"), [
    (None, {}, "no adapter_config.json"),
    ({"fine_tune_type": "dora", "lora_parameters": {"rank": 8, "scale": 2.0}}, {}, "fine_tune_type 'dora'"),
    ({"r": 8, "lora_alpha": 16, "use_dora": True}, {}, "DoRA"),
    ({"r": 8, "lora_alpha": 16, "bias": "all"}, {}, "bias"),
    ({"rank": 8}, {}, "neither mlx-lm's"),
    ({"lora_parameters": {"rank": 16, "scale": 2.0}},
     {"model.layers.0.self_attn.q_proj.lora_a": (576, 16), "model.layers.0.self_attn.q_proj.lora_b": (16, 576)},
     "rank 16 exceeds --max-lora-rank 8"),
    ({"lora_parameters": {"rank": 8, "scale": 2.0}}, {"model.layers.0.self_attn.q_proj.lora_a": (576, 8)},
     "lacks its A or B"),
    ({"lora_parameters": {"rank": 8, "scale": 2.0}},
     {"model.layers.0.self_attn.nope.lora_a": (576, 8), "model.layers.0.self_attn.nope.lora_b": (8, 576)},
     "has no module model.layers.0.self_attn.nope"),
], ids=["no-config", "mlx-dora", "peft-dora", "peft-bias", "unknown-layout", "rank", "half-pair", "no-module"])
def test_adapters_the_plugin_cannot_apply_are_refused_naming_why(models, tmp_path, config, files, needle):
    """What ``--lora-modules`` (or a request's adapter) loads: each refusal says what is wrong."""
    import torch

    from vllm_metal.loader import load
    from vllm_metal.lora import LoRAError, LoRAs

    if config is not None:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    if files:
        mx.save_safetensors(str(tmp_path / "adapters.safetensors"),
                            {k: mx.zeros(shape) for k, shape in files.items()})
    loaded = load(models.hf, torch.float32)
    with pytest.raises(LoRAError, match=needle):
        LoRAs(loaded.model, loaded.dtype, max_rank=RANK).add(1, str(tmp_path))
