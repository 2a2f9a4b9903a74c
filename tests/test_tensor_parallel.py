"""Tensor parallelism (`--tensor-parallel-size N`): N worker processes under vLLM's multiprocessing
executor, joined by MLX's ring backend on loopback, each holding its shard of the model and of the
K/V heads. Greedy tokens equal one process's: transformers' fp32 tokens on tiny checkpoints of the
families mlx-lm shards, the single-process server's on the bundled model; batched, chunked,
preempted and prefix-cached. Also: a model that does not split is refused at startup, a rank that
dies ends the server instead of hanging it, and two "machines" (scripts/two_macs.sh: two
`vllm serve`, one headless) serve as one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import LOG_DIR, SERVER_DEVICE, VllmServer, completion_tokens, serve_expecting_failure
from references import hf_greedy, hf_logprobs, mlx_greedy, prompt_ids
from test_models import N_NEW, STEP_TOKENS, _first_divergence, _prompts

from fixtures import tiny
from vllm_metal.distributed import free_ports

TP = 2
QUANTIZED = "qwen3-q4"  # the qwen3 checkpoint as mlx_lm.convert -q makes it, against mlx-lm's tokens
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "two_macs.sh"
FAMILIES = ["qwen3", "qwen3_moe", QUANTIZED]  # llama: test_two_machines_on_loopback, and the bundled model


def _split_spec(name: str) -> tiny.TinySpec:
    """The matrix's checkpoint with at least TP key/value heads (mlx-lm splits heads, it does
    not replicate them; the real checkpoints have 8 and 4)."""
    spec = tiny.BY_NAME[name]
    return replace(spec, config={**spec.config, "num_key_value_heads": max(TP, spec.config["num_key_value_heads"])})


def _block_bytes(config: dict) -> int:
    """One rank's K/V bytes per 16-token block, fp32: its share of the heads in every layer."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * (config["num_key_value_heads"] // TP) * head_dim * 4 * 16


@pytest.mark.parametrize("name", FAMILIES)
def test_tensor_parallel_matches_transformers(name, tmp_path):
    """Eight concurrent distinct requests (short, and four of ~100 tokens chunked in 32-token steps)
    on K/V for 128 tokens (8 blocks, what one request of --max-model-len needs, and vLLM's null
    block), so some are preempted; one step ahead, async scheduling. Then a repeat that hits the
    prefix cache. Every output equals transformers' greedy decoding of the unsharded model (the
    4-bit checkpoint: mlx-lm's, on the same weights)."""
    spec = _split_spec(name.removesuffix("-q4"))
    path = tiny.build(spec, tmp_path / name)
    prompts = _prompts(path)
    long = prompts[2]
    prompts += [long[k:] for k in (1, 2, 3)] + [prompts[3][1:]]  # eight distinct: no shared prefix blocks
    if name == QUANTIZED:  # 4-bit shards of quantized layers
        path = tiny.quantize(path, tmp_path / f"{name}-mlx")
        want = [mlx_greedy(path, p, N_NEW) for p in prompts]
    else:
        want = [hf_greedy(path, p, N_NEW) for p in prompts]
    server = VllmServer(path, ["--tensor-parallel-size", str(TP), "--dtype", "float32", "--max-model-len", "128",
                               "--max-num-seqs", "8", "--max-num-batched-tokens", str(STEP_TOKENS),
                               "--kv-cache-memory-bytes", str(9 * _block_bytes(spec.config)), "--seed", "0",
                               "--async-scheduling", "--no-scheduler-reserve-full-isl"],
                        env={"VLLM_METAL_ONE_STEP_AHEAD": "1"}, name=f"tp-{name}")
    try:
        for _ in range(4):  # arrival order decides how often (a first round often goes without)
            with ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(lambda p: completion_tokens(server, p, N_NEW), prompts))
            for i, tokens in enumerate(got):
                assert tokens == want[i], f"prompt {i}: {_first_divergence(tokens, want[i])}"
            if server.metrics().get("vllm:num_preemptions_total", 0.0) > 0:
                break
        assert server.metrics().get("vllm:num_preemptions_total", 0.0) > 0, "meant to force preemption"
        hits = server.metrics().get("vllm:prefix_cache_hits_total", 0.0)
        for _ in range(2):
            assert completion_tokens(server, prompts[2], N_NEW) == want[2]
        assert server.metrics().get("vllm:prefix_cache_hits_total", 0.0) - hits >= 64
    finally:
        server.stop()


def test_bundled_model_on_three_ranks_matches_one(models, server):
    """SmolLM2-135M has 9 query and 3 key/value heads, so it splits 3 ways (not 2): four
    concurrent prompts of up to 300+ tokens give the single-process server's tokens."""
    prompts = prompt_ids(models.hf)[:4]
    want = [completion_tokens(server, p, 16) for p in prompts]
    tp3 = VllmServer(models.hf, ["--tensor-parallel-size", "3", "--dtype", "float32", "--max-model-len", "1024",
                                 "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(64 * 2**20), "--seed", "0"],
                     name="tp3-bundled")
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: completion_tokens(tp3, p, 16), prompts))
        for i, tokens in enumerate(got):
            assert tokens == want[i], f"prompt {i}: {_first_divergence(tokens, want[i])}"
    finally:
        tp3.stop()


@pytest.mark.parametrize("case", ["heads", "hostfile", "nccl"])
def test_unrunnable_tensor_parallel_setups_are_refused(case, models, tmp_path):
    """Refused before any weights load, naming what to change (tests/test_platform.py has the
    executor refusal)."""
    args = ["--dtype", "float32", "--max-model-len", "256"]
    env, model = {}, models.hf
    if case == "heads":  # vLLM would replicate a K/V head across ranks; mlx-lm's shard splits them
        model = tiny.build(tiny.BY_NAME["llama3"], tmp_path / "llama3")
        args += ["--tensor-parallel-size", "2"]
        expected = "4 query and 1 key/value heads, which do not split evenly 2 ways"
    elif case == "nccl" and SERVER_DEVICE == "cpu":
        args += ["--tensor-parallel-size", "3"]
        env = {"VLLM_METAL_DISTRIBUTED_BACKEND": "nccl"}
        expected = "VLLM_METAL_DISTRIBUTED_BACKEND=nccl needs MLX computing on NVIDIA GPUs"
    elif case == "nccl":  # on a GPU: ranks on two machines need the rendezvous address
        model = tiny.build(_split_spec("qwen3"), tmp_path / "qwen3")
        args += ["--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1"]
        env = {"VLLM_METAL_DISTRIBUTED_BACKEND": "nccl"}
        expected = "meet at NCCL_HOST_IP:NCCL_PORT"
    else:
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps([["127.0.0.1:5000"]]))
        args += ["--tensor-parallel-size", "3"]
        env = {"VLLM_METAL_HOSTFILE": str(hostfile)}
        expected = "lists 1 ranks but --tensor-parallel-size is 3"
    out = serve_expecting_failure(model, args, env=env, name=f"tp-refused-{case}")
    assert out.returncode not in (0, None), out.tail()
    assert expected in out.output, out.tail()


def _ranks(server: VllmServer) -> dict[int, psutil.Process]:
    """The server's worker processes by tensor-parallel rank (vLLM titles them ``Worker_TP<r>``)."""
    found = {}
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        title = " ".join(proc.cmdline())
        for r in range(TP):
            if f"Worker_TP{r}" in title:
                found[r] = proc
    return found


def test_rank_that_dies_ends_the_server(tmp_path):
    """Rank 1 killed during a generation: the request fails and the server exits with the reason
    (vLLM's executor sees the rank die; rank 0's collective fails and it exits too)."""
    spec = _split_spec("qwen3")
    path = tiny.build(spec, tmp_path / "qwen3")
    server = VllmServer(path, ["--tensor-parallel-size", str(TP), "--dtype", "float32", "--max-model-len", "512",
                               "--kv-cache-memory-bytes", str(64 * _block_bytes(spec.config))], name="tp-rank-dies")
    try:
        chunks: list[dict] = []
        streaming = threading.Event()

        def generate():
            body = {"model": server.model, "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunks.append(json.loads(line[6:]))
                            streaming.set()
            except httpx.HTTPError:
                pass  # the connection ending is one way for the failure to show
            finally:
                streaming.set()

        request = threading.Thread(target=generate)
        request.start()
        ranks = _ranks(server)
        assert set(ranks) == {0, 1}, f"worker processes by rank: {ranks}"
        assert streaming.wait(timeout=120), "no token streamed"
        ranks[1].send_signal(signal.SIGKILL)  # the generation is under way: 1 of 400 tokens out
        request.join(timeout=120)
        assert not request.is_alive(), "the request hung after a rank died"
        finished = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
        assert "length" not in finished, "a generation that lost a rank half-way reported success"
        server.proc.wait(timeout=120)  # raises if the server hangs
        assert "Worker proc VllmWorker-1 died unexpectedly" in server.log_path.read_text(errors="replace")
    finally:
        server.stop()


def _random_sampling_keeps_ranks_together(server: VllmServer, path: Path, prompt: list[int]) -> None:
    """Unseeded random sampling (temperature 1): every rank must draw the same token, or the
    others compute the next step on a token rank 0 never returned and the summed logits stop
    being the model's. The log-probability the server reports for each sampled token equals
    transformers' for that token in the returned context."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": 24, "temperature": 1.0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 0}
    r = server.post("/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    tokens, served = choice["token_ids"], choice["logprobs"]["token_logprobs"]
    want = hf_logprobs(path, prompt, tokens)
    worst = max(abs(a - b) for a, b in zip(served, want, strict=True))
    assert worst < 1e-3, f"sampled tokens' logprobs differ from transformers' by up to {worst}"


def test_two_machines_on_loopback(tmp_path):
    """scripts/two_macs.sh with both "machines" here: the head (`--nnodes 2 --node-rank 0`, the
    API) and a headless worker (`--node-rank 1`), ranks found through the ring hostfile the
    script writes (VLLM_METAL_HOSTFILE), vLLM's control plane over TCP. Greedy tokens equal
    transformers', and so do the log-probabilities of randomly sampled ones."""
    spec = _split_spec("llama3")
    path = tiny.build(spec, tmp_path / "llama3")
    prompts = _prompts(path)
    want = [hf_greedy(path, p, N_NEW) for p in prompts]
    ring, master = free_ports(2)
    env = {"RING_PORT": str(ring), "MASTER_PORT": str(master), "VLLM_MLX_DEVICE": SERVER_DEVICE,
           "VLLM_METAL_HOSTFILE": str(tmp_path / "hosts.json"),
           "VLLM_CMD": f"{sys.executable} -m vllm.entrypoints.cli.main"}
    serve = ["--dtype", "float32", "--max-model-len", "256", "--seed", "0",
             "--kv-cache-memory-bytes", str(64 * _block_bytes(spec.config))]

    def two_macs(role: str, *extra: str) -> list[str]:
        return ["bash", str(SCRIPT), role, "127.0.0.1", "127.0.0.1", str(path), *serve, *extra]

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / "tp-two-macs-worker.log", "w") as log:
        worker = subprocess.Popen(two_macs("worker"), stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **env}, start_new_session=True)
    try:
        head = VllmServer(path, [], env=env, name="tp-two-macs-head",
                          command=lambda port: two_macs("head", "--host", "127.0.0.1", "--port", str(port)))
        try:
            with ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(lambda p: completion_tokens(head, p, N_NEW), prompts))
            for i, tokens in enumerate(got):
                assert tokens == want[i], f"prompt {i}: {_first_divergence(tokens, want[i])}"
            _random_sampling_keeps_ranks_together(head, path, prompts[2])
        finally:
            head.stop()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
