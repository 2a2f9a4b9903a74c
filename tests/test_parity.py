"""Greedy parity through a live `vllm serve`: HF transformers fp32 and mlx-lm on the same weights,
alone, concurrent, chunked, prefix-cached, preempted, and on the 4-bit MLX checkpoint."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import VllmServer, completion_tokens
from references import hf_greedy, mlx_greedy, prompt_ids

from vllm_metal.model_runner import StepRecord

N_NEW = 32


@pytest.fixture(scope="module")
def prompts(models):
    ids = prompt_ids(models.hf)
    assert len(ids) == 8 and max(map(len, ids)) > 300
    return ids


@pytest.fixture(scope="module")
def hf_reference(models, prompts):
    return [hf_greedy(models.hf, p, N_NEW) for p in prompts]


@pytest.fixture(scope="module")
def sequential(server, prompts):
    return [completion_tokens(server, p, N_NEW) for p in prompts]


def test_greedy_matches_hf_transformers_fp32(sequential, hf_reference):
    for i, (got, want) in enumerate(zip(sequential, hf_reference, strict=True)):
        assert got == want, f"prompt {i}: plugin {got} != HF {want}"


def test_greedy_matches_mlx_lm_generate(models, prompts, sequential):
    for i, p in enumerate(prompts):
        assert sequential[i] == mlx_greedy(models.mlx, p, N_NEW), f"prompt {i}"


def test_concurrent_requests_match_sequential(server, prompts, sequential):
    jobs = [p for p in prompts for _ in range(2)]  # 16 at once
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda p: completion_tokens(server, p, N_NEW), jobs))
    for i, tokens in enumerate(got):
        assert tokens == sequential[i // 2], f"request {i}"


def test_prefix_cache_hit_keeps_tokens(server, prompts, sequential):
    before = server.metrics().get("vllm:prefix_cache_hits_total", 0.0)
    long_prompt = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    again = completion_tokens(server, prompts[long_prompt], N_NEW)
    after = server.metrics().get("vllm:prefix_cache_hits_total", 0.0)
    assert again == sequential[long_prompt]
    assert after - before >= 256, f"expected a prefix-cache hit, hits went {before} -> {after}"


@pytest.fixture(scope="module")
def squeezed(models):
    """Chunked prefill (64-token steps) and a KV budget of 40 blocks, so 16 concurrent requests
    must be preempted; multiprocess executor with async scheduling, to cover that path too, and
    one step ahead (device sampling; ``auto`` turns it on only on a GPU) beside the structured
    requests the host samples.

    `--no-scheduler-reserve-full-isl` admits a request once its first chunk fits (vLLM 0.32's
    default waits until the whole prompt fits, which leaves only decode growth to preempt, and at
    this budget decode growth alone does not reliably preempt), so requests are also preempted
    part-way through their prefill."""
    block_bytes = 30 * 2 * 3 * 64 * 4 * 16  # layers x (K,V) x kv_heads x head_dim x fp32 x block
    srv = VllmServer(
        models.hf,
        ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
         "--max-num-batched-tokens", "64", "--kv-cache-memory-bytes", str(40 * block_bytes),
         "--distributed-executor-backend", "mp", "--async-scheduling", "--no-enable-prefix-caching",
         "--no-scheduler-reserve-full-isl"],
        env={"VLLM_METAL_ONE_STEP_AHEAD": "1", "VLLM_METAL_DEBUG": "1"},
        name="squeezed",
    )
    yield srv
    srv.stop()


def test_chunked_prefill_and_preemption_keep_tokens(squeezed, prompts, sequential):
    """16 greedy requests plus 4 json_schema-constrained chats at once: every greedy output is
    unchanged and every constrained one validates, through chunking and preemption."""
    import openai
    from test_structured import SCHEMAS, _schema_chat, _schema_violation

    client = openai.OpenAI(base_url=squeezed.url, api_key="x", max_retries=0, timeout=600)
    jobs = [("free", i) for i in range(16)] + [("json", k) for k in range(4)]

    def run(job):
        kind, i = job
        if kind == "free":
            return completion_tokens(squeezed, prompts[i // 2], N_NEW)
        return _schema_chat(client, squeezed, i % len(SCHEMAS), seed=i)

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    for i, tokens in enumerate(got[:16]):
        assert tokens == sequential[i // 2], f"request {i}"
    for schema, choice, usage in got[16:]:
        assert _schema_violation(schema, choice, usage) is None
    preemptions = squeezed.metrics().get("vllm:num_preemptions_total", 0.0)
    assert preemptions > 0, "the KV budget was meant to force preemption"
    # The greedy requests were sampled on the device, the constrained ones by vLLM's Sampler
    # (VLLM_METAL_DEBUG's step records say which).
    records = [r for r in map(StepRecord.from_log, squeezed.log_path.read_text().splitlines()) if r is not None]
    assert any(r.on_device for r in records), "no step was sampled on the device"
    assert any(not r.on_device and r.decode for r in records), "no decode step was sampled on the host"


def test_4bit_checkpoint_matches_mlx_lm(models, prompts):
    """--dtype float32: the checkpoint keeps fp32 scales, which mlx-lm uses as they are (vLLM
    would downcast them to bf16 by default). Also covers the uni executor without async
    scheduling."""
    srv = VllmServer(models.mlx_4bit, ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
                                       "--no-async-scheduling",
                                       "--kv-cache-memory-bytes", str(64 * 2**20)], name="mlx4bit")
    try:
        for p in prompts[:2]:
            assert completion_tokens(srv, p, 12) == mlx_greedy(models.mlx_4bit, p, 12)
    finally:
        srv.stop()


def test_mlx_managed_cache_path_keeps_tokens(models, prompts, sequential):
    """VLLM_METAL_USE_PAGED_ATTENTION=0: mlx-lm's per-request caches under the same squeeze
    (64-token chunks, 56 blocks, first-chunk admission, preemption) give the paged path's tokens, and a
    prefix-cache hit restores a snapshot instead of changing anything."""
    block_bytes = 30 * 2 * 3 * 64 * 4 * 16
    srv = VllmServer(
        models.hf,
        ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
         "--max-num-batched-tokens", "64", "--kv-cache-memory-bytes", str(56 * block_bytes),
         "--no-scheduler-reserve-full-isl"],
        env={"VLLM_METAL_USE_PAGED_ATTENTION": "0", "VLLM_METAL_PREFIX_CACHE": "1",
             "VLLM_METAL_DEBUG": "1"},
        name="mlx-managed",
    )
    try:
        jobs = [p for p in prompts for _ in range(2)]
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda p: completion_tokens(srv, p, N_NEW), jobs))
        for i, tokens in enumerate(got):
            assert tokens == sequential[i // 2], f"request {i}"
        assert srv.metrics().get("vllm:num_preemptions_total", 0.0) > 0
        long_prompt = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        before = srv.metrics().get("vllm:prefix_cache_hits_total", 0.0)
        assert completion_tokens(srv, prompts[long_prompt], N_NEW) == sequential[long_prompt]
        assert srv.metrics().get("vllm:prefix_cache_hits_total", 0.0) - before >= 256
        log = srv.log_path.read_text()
        assert "MLX-managed KV cache" in log
        # VLLM_METAL_DEBUG records each step's host time split where the engine calls the runner,
        # as benchmarks.investigations.served_steps reads it (the last request decoded alone).
        from benchmarks.investigations.served_steps import decode_steps, request_steps

        steps = decode_steps(log)
        assert len(steps) >= N_NEW - 1, log[-2000:]
        # ...and splits them by request: the long prompt's prefill chunks, then one step per token
        assert len(request_steps(log)[-1]) == len(sequential[long_prompt]) - 1, log[-2000:]
        for s in steps:  # launch and wait are parts of forward
            assert s["forward"] > 0 and s["launch"] > 0 and s["sample"] > 0, s
            assert s["launch"] + s["wait"] <= s["forward"] + 0.02, s
        restored = [r.restored_tokens for r in map(StepRecord.from_log, log.splitlines()) if r is not None]
        assert max(restored) >= 256, "the hit should have been served from a K/V snapshot"
    finally:
        srv.stop()


def test_server_names_the_blas_behind_mlx_cpu_matmuls(server, sequential):
    """Served on MLX's CPU backend, the worker runs its matmuls on OpenBLAS (VLLM_METAL_CPU_BLAS=auto)
    and says so; the tokens above were computed that way. On a GPU there is no such line."""
    log = server.log_path.read_text(errors="replace")
    lines = [ln for ln in log.splitlines() if "MLX's CPU matmuls use" in ln]
    if "worker on MLX cpu" in log:
        assert lines and "libopenblas" in lines[-1] and "VLLM_METAL_CPU_BLAS=auto" in lines[-1], lines
    else:
        assert not lines
