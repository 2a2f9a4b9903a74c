"""The supported-model matrix, proven per architecture through a live `vllm serve`.

For each architecture in ``fixtures.tiny`` we build a tiny random-weight checkpoint from
the real model's config, serve it with the plugin (fp32, chunked prefill with a 32-token step
budget, prefix caching) and send four greedy completions at once (two short prompts, one that
is chunked and crosses the sliding window, one medium) and then the long one again for a
prefix-cache hit. Every output must equal greedy decoding by HF transformers on the same weights
(or by mlx-lm, where the two legitimately differ: see ``REFERENCE_MLX``). Architectures the
plugin cannot run must be refused at startup with a reason (``EXPECTED_REFUSALS``).

Results go to ``$VLLM_METAL_MATRIX_OUT`` (default ``<test logs>/model_matrix.json``);
``scripts/gen_supported_models.py`` turns them into docs/supported_models.md, and the last test
checks that the committed doc agrees with this run.

Server starts dominate the time, so the next architecture's server starts while the current one
is tested (``VLLM_METAL_MATRIX_PARALLEL`` servers at once, default 2).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    LOG_DIR,
    VllmServer,
    completion_tokens,
    metal_worker,
    runner_step,
    serve_expecting_failure,
)
from references import LONG_TEXT, PROMPTS, hf_greedy, tokenizer

from fixtures import tiny
from vllm_metal import mlx_lm_models

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gen_supported_models  # noqa: E402

N_NEW = 12
STEP_TOKENS = 32  # --max-num-batched-tokens: the 100-token prompt is prefilled in 4 chunks
LONG_TOKENS = 100
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8",
              "--max-num-batched-tokens", str(STEP_TOKENS), "--enable-chunked-prefill",
              "--enable-prefix-caching", "--kv-cache-memory-bytes", str(16 * 2**20), "--seed", "0"]

# mlx-lm and transformers compute these differently on purpose; the plugin runs mlx-lm's model,
# so it is compared with mlx-lm's own greedy decoding on the same checkpoint.
REFERENCE_MLX = {
    "phi3": "longrope: mlx-lm's SuScaledRoPE always applies long_factor; transformers (and vLLM) "
            "use short_factor until the sequence exceeds original_max_position_embeddings, so "
            "outputs differ from transformers for contexts up to 4096 tokens.",
}
# mlx-lm's own model attends over the whole context where the plugin (as transformers) applies
# sliding windows, so comparisons with mlx-lm (the quantized column) stay within the window.
MLX_WHOLE_CONTEXT = {"gemma2"}
# Refused at startup: (text the `vllm serve` refusal must contain, text the plugin's own check
# must give, the underlying cause for the docs).
EXPECTED_REFUSALS = {
    "opt": ("Supported model types: ", "Supported model types: ",
            "mlx-lm has no module for this architecture"),
}
# Hybrid models: recurrent-state layers keep one state per request, so the platform turns prefix
# caching off for them (vLLM's registry marks them hybrid); the repeat must give the same tokens
# without a hit.
PREFIX_CACHE_OFF = {"qwen3_5", "qwen3_5_moe", "qwen3_next", "lfm2", "granitemoehybrid"}
SUPPORTED = [s for s in tiny.SPECS if s.name not in EXPECTED_REFUSALS]
REFUSED = [s for s in (*tiny.SPECS, tiny.UNSUPPORTED) if s.name in EXPECTED_REFUSALS]
ORDER = [s.name for s in (*SUPPORTED, *REFUSED)]

RESULTS: dict[str, dict] = {}


def _versions() -> dict[str, str]:
    return {d: importlib.metadata.version(d) for d in ("vllm", "mlx", "mlx-lm", "transformers", "torch")}


def _prompts(hf_dir: Path) -> list[list[int]]:
    """Short, short, long (chunked, crosses every sliding window), medium: token ids."""
    tok = tokenizer(hf_dir)
    long_ids = tok(LONG_TEXT)["input_ids"][:LONG_TOKENS]
    assert len(long_ids) == LONG_TOKENS
    return [tok(PROMPTS[0])["input_ids"], tok(PROMPTS[1])["input_ids"], long_ids,
            tok(PROMPTS[3] + " " + PROMPTS[5])["input_ids"]]


def _results_path() -> Path:
    return Path(os.environ.get("VLLM_METAL_MATRIX_OUT") or LOG_DIR / "model_matrix.json")


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    """Merge this run's rows into the results file (a partial run keeps the other rows)."""
    yield
    if not RESULTS:
        return
    path = _results_path()
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}
    rows.update(RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows}, indent=1, sort_keys=True))


class Launcher:
    """Starts each architecture's server (or refused start) ahead of its test, a few at once."""

    def __init__(self, names: list[str], root: Path, parallel: int):
        self.names = names
        self.root = root
        self.parallel = parallel
        self.pool = ThreadPoolExecutor(max(1, parallel))
        self.jobs: dict[str, Future] = {}

    def _job(self, name: str) -> Callable[[], object]:
        spec = tiny.BY_NAME[name]

        def run():
            path = tiny.build(spec, self.root / name)
            started = time.monotonic()
            if name in EXPECTED_REFUSALS:
                out = serve_expecting_failure(path, SERVE_ARGS, name=f"matrix-{name}-refused")
            else:
                out = VllmServer(path, SERVE_ARGS, name=f"matrix-{name}")
            return path, out, time.monotonic() - started

        return run

    def get(self, name: str):
        """Result of ``name``'s job; also queues the next ``parallel - 1`` jobs."""
        i = self.names.index(name)
        for ahead in self.names[i : i + self.parallel]:
            if ahead not in self.jobs:
                self.jobs[ahead] = self.pool.submit(self._job(ahead))
        return self.jobs[name].result()

    def release(self, name: str) -> None:
        """Stop ``name``'s server once its test is done (each holds ~1 GB)."""
        future = self.jobs.get(name)
        if future is not None and future.done() and future.exception() is None:
            out = future.result()[1]
            if isinstance(out, VllmServer):
                out.stop()

    def close(self) -> None:
        for future in self.jobs.values():
            if future.done() and future.exception() is None:
                out = future.result()[1]
                if isinstance(out, VllmServer):
                    out.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for future in self.jobs.values():  # finished during shutdown
            if not future.cancelled() and future.exception() is None:
                out = future.result()[1]
                if isinstance(out, VllmServer):
                    out.stop()


@pytest.fixture(scope="module")
def launcher(request, tmp_path_factory):
    selected = {item.callspec.params.get("name") for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    names = [n for n in ORDER if n in selected]
    parallel = int(os.environ.get("VLLM_METAL_MATRIX_PARALLEL", "2"))
    launch = Launcher(names, tmp_path_factory.mktemp("tiny-models"), parallel)
    yield launch
    launch.close()


def _row(spec: tiny.TinySpec, test_id: str) -> dict:
    return {
        "name": spec.name, "family": spec.family, "source": spec.source,
        "architecture": spec.architecture, "model_type": spec.config["model_type"],
        "mlx_module": _mlx_module(spec.config),
        "features": list(spec.features), "test": test_id, "outcome": "fail", "checks": {},
        "reason": "", "date": datetime.date.today().isoformat(), "versions": _versions(),
    }


def _mlx_module(config: dict) -> str | None:
    try:
        return mlx_lm_models.check_supported(config)
    except mlx_lm_models.UnsupportedModelError:
        return None


def _mlx_reference(path: Path, prompts: list[list[int]], n_new: int = N_NEW) -> list[list[int]]:
    """mlx-lm's own greedy decoding, with the config fixes the plugin's loader applies."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_config, load_model

    model, _ = load_model(path, model_config=mlx_lm_models.prepare_mlx_lm(load_config(path)))
    return [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=n_new)] for p in prompts]


def _first_divergence(got: list[int], want: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    return "equal" if i is None else f"token {i}: {got[i]} != {want[i]}"


@pytest.mark.parametrize("name", [s.name for s in SUPPORTED])
def test_architecture_matches_reference(name, launcher, request):
    """Batched + chunked + prefix-cached greedy output equals the reference, token for token."""
    spec = tiny.BY_NAME[name]
    row = RESULTS[name] = _row(spec, request.node.nodeid)
    started = time.monotonic()
    try:
        path, server, startup = launcher.get(name)
        row["startup_s"] = round(startup, 1)
        prompts = _prompts(path)
        ref_kind = "mlx-lm" if name in REFERENCE_MLX else "transformers"
        row["reference"] = ref_kind
        row["reference_note"] = REFERENCE_MLX.get(name, "")
        if ref_kind == "mlx-lm":
            want = _mlx_reference(path, prompts)
        else:
            want = [hf_greedy(path, p, N_NEW) for p in prompts]
        for w in want:  # a degenerate model (one repeated token) would prove little
            assert len(set(w)) >= 3, f"reference output degenerate: {w}"

        hits_before = server.metrics().get("vllm:prefix_cache_hits_total", 0.0)
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: completion_tokens(server, p, N_NEW), prompts))
        short_ok = all(got[i] == want[i] for i in (0, 1, 3))
        row["checks"]["batched"] = short_ok
        row["checks"]["chunked"] = got[2] == want[2]
        again = completion_tokens(server, prompts[2], N_NEW)
        hits = server.metrics().get("vllm:prefix_cache_hits_total", 0.0) - hits_before
        row["prefix_cache_hits"] = hits
        cache_off = name in PREFIX_CACHE_OFF
        row["checks"]["prefix_cache"] = "off" if cache_off else again == want[2] and hits >= LONG_TOKENS // 2
        row["checks"]["paged"] = short_ok and got[2] == want[2]

        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"prompt {i} ({len(prompts[i])} tokens): {_first_divergence(g, w)}"
        assert again == want[2], f"repeat of the long prompt: {_first_divergence(again, want[2])}"
        if cache_off:
            assert hits == 0 and "prefix caching is off" in server.log_path.read_text(), "expected prefix caching off"
        else:
            assert hits >= LONG_TOKENS // 2, f"expected a prefix-cache hit, got {hits} hit tokens"
        row["outcome"] = "pass"
    except Exception as exc:
        row["reason"] = f"{type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        row["duration_s"] = round(time.monotonic() - started, 1)
        launcher.release(name)


@pytest.mark.parametrize("name", [s.name for s in REFUSED])
def test_architecture_is_refused_at_startup(name, launcher, request):
    """`vllm serve` exits non-zero with the plugin's reason; an unknown type lists the known ones."""
    spec = tiny.BY_NAME[name]
    row = RESULTS[name] = _row(spec, request.node.nodeid)
    started = time.monotonic()
    try:
        path, out, startup = launcher.get(name)
        row["startup_s"] = round(startup, 1)
        log = out.output
        assert out.returncode is not None, f"vllm serve hung at startup:\n{out.tail()}"
        # Refused in the API server before the engine starts (a pydantic "Value error" wrapping
        # the plugin's preflight check), or by the loader in the engine process.
        match = re.search(r"(?:UnsupportedModelError: |Value error, )(.+?)(?: \[type=value_error.*)?$",
                          log, re.M)
        assert out.returncode != 0, "vllm serve started; the plugin was expected to refuse it"
        assert match, f"no refusal reason in the log:\n{log[-3000:]}"
        reason = match.group(1).strip()
        served, own, cause = EXPECTED_REFUSALS[name]
        assert served in reason, reason
        with pytest.raises(mlx_lm_models.UnsupportedModelError) as refusal:  # the plugin's own verdict
            mlx_lm_models.check_runnable(json.loads((path / "config.json").read_text()))
        assert own in str(refusal.value), str(refusal.value)
        if name == tiny.UNSUPPORTED.name:
            listed = reason.split("Supported model types: ")[1]
            assert {"llama", "qwen3", "gemma3_text", "gpt_oss"} <= set(listed.rstrip(".").split(", "))
        row["outcome"] = "refused"
        row["reason"] = reason.split(" Supported model types:")[0]
        row["cause"] = cause
    except Exception as exc:
        row["reason"] = f"{type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        row["duration_s"] = round(time.monotonic() - started, 1)


def _drive(worker, prompts: list[list[int]], n_new: int, budget: int) -> list[list[int]]:
    """Serve ``prompts`` at once through the runner as vLLM's scheduler would: every step, each
    decoding request gets one token and the rest of ``budget`` goes to prefill chunks in order;
    blocks are handed out as the contexts grow. Returns each request's ``n_new`` greedy tokens."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData

    block = worker.model_runner.block_size
    reqs = {f"r{i}": {"ids": list(p), "done": 0, "out": [], "blocks": [], "started": False}
            for i, p in enumerate(prompts)}
    next_block = 1
    while any(len(r["out"]) < n_new for r in reqs.values()):
        scheduled, new, cached, left = {}, [], [], budget
        for req_id, r in reqs.items():
            if len(r["out"]) >= n_new or left == 0:
                continue
            history = r["ids"] + r["out"]
            n = min(len(history) - r["done"], left)
            left -= n
            need = -(-(r["done"] + n) // block) - len(r["blocks"])
            grown = list(range(next_block, next_block + max(need, 0)))
            next_block += len(grown)
            r["blocks"] += grown
            scheduled[req_id] = n
            if not r["started"]:
                params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
                new.append(NewRequestData(req_id=req_id, prompt_token_ids=r["ids"], mm_features=[],
                                          sampling_params=params, pooling_params=None,
                                          block_ids=(list(r["blocks"]),), num_computed_tokens=0,
                                          lora_request=None))
                r["started"] = True
            else:
                cached.append((req_id, r["done"], grown, len(r["out"])))
        data = CachedRequestData(
            req_ids=[c[0] for c in cached], resumed_req_ids=set(), new_token_ids=[[] for _ in cached],
            all_token_ids={}, new_block_ids=[(c[2],) for c in cached],
            num_computed_tokens=[c[1] for c in cached], num_output_tokens=[c[3] for c in cached])
        out = runner_step(worker, scheduled=scheduled, new=new, cached=data)
        for req_id, n in scheduled.items():
            reqs[req_id]["done"] += n
            reqs[req_id]["out"] += out.sampled_token_ids[out.req_id_to_index[req_id]]
    return [r["out"][:n_new] for r in reqs.values()]


@pytest.mark.parametrize("name", [s.name for s in SUPPORTED])
def test_quantized_checkpoint_matches_mlx_lm(name, tmp_path):
    """The architecture as a 4-bit MLX checkpoint (group 32, as ``mlx_lm.convert -q`` makes it)
    run by the runner (a short prompt decoding beside the 100-token one prefilled in 32-token
    chunks; two short ones within the window for ``MLX_WHOLE_CONTEXT``) gives mlx-lm's own greedy
    tokens on the same quantized weights."""
    spec = tiny.BY_NAME[name]
    q4 = tiny.quantize(tiny.build(spec, tmp_path / "hf"), tmp_path / "q4")
    prompts = _prompts(q4)
    prompts, n_new = [prompts[0], prompts[2]], N_NEW
    if name in MLX_WHOLE_CONTEXT:  # compared only while every context fits the window
        window = spec.config["sliding_window"]
        prompts, n_new = [prompts[0], prompts[0][:3]], window - len(prompts[0])
    want = _mlx_reference(q4, prompts, n_new)
    worker = metal_worker(q4, dtype="float32", max_model_len=256, num_blocks=32, block_size=16)
    try:
        got = _drive(worker, prompts, n_new, STEP_TOKENS)
    finally:
        worker.shutdown()
    ok = got == want
    if name in RESULTS:
        RESULTS[name]["checks"]["quantized"] = ok
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"prompt {i} ({len(prompts[i])} tokens): {_first_divergence(g, w)}"


def test_kv_sharing_layers_hold_no_kv_memory(tmp_path):
    """Gemma 4 E2B's last ``num_kv_shared_layers`` layers read earlier layers' K/V: the worker
    tells vLLM about the six layers that hold K/V only, and a block costs those six layers'
    bytes. (Its greedy tokens are held to transformers in the matrix above.)"""
    spec = tiny.BY_NAME["gemma4_e2b"]
    worker = metal_worker(tiny.build(spec, tmp_path / spec.name), dtype="float32", max_model_len=256,
                          num_blocks=16, block_size=16)
    owners = spec.config["num_hidden_layers"] - spec.config["num_kv_shared_layers"]
    kv_specs = worker.get_kv_cache_spec()
    assert list(kv_specs) == [f"model.layers.{i}.self_attn" for i in range(owners)]
    assert worker.model_runner.kv_bytes_per_block() == sum(s.page_size_bytes for s in kv_specs.values())


def test_hybrid_model_keeps_tokens_through_preemption(tmp_path):
    """Qwen3-Next (Gated DeltaNet + attention) with K/V for a third of its concurrent requests:
    requests are preempted part-way, their recurrent state is freed and rebuilt from position 0 on
    resume, and every output still equals transformers' greedy decoding. One step ahead (tokens
    sampled on the device) and the multiprocess executor, as a busy server runs."""
    spec = tiny.BY_NAME["qwen3_next"]
    path = tiny.build(spec, tmp_path / spec.name)
    prompts = _prompts(path)
    want = [hf_greedy(path, p, N_NEW) for p in prompts]
    block_bytes = 2 * spec.config["num_key_value_heads"] * spec.config["head_dim"] * 4 * 16  # one attention layer
    server = VllmServer(path, ["--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8",
                               "--max-num-batched-tokens", str(STEP_TOKENS), "--async-scheduling",
                               "--kv-cache-memory-bytes", str(12 * block_bytes), "--seed", "0",
                               "--no-scheduler-reserve-full-isl", "--distributed-executor-backend", "mp"],
                        env={"VLLM_METAL_ONE_STEP_AHEAD": "1"}, name="hybrid-preempted")
    try:
        jobs = [i for i in range(len(prompts)) for _ in range(2)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda i: completion_tokens(server, prompts[i], N_NEW), jobs))
        for k, (i, tokens) in enumerate(zip(jobs, got, strict=True)):
            assert tokens == want[i], f"request {k} (prompt {i}): {_first_divergence(tokens, want[i])}"
        assert server.metrics().get("vllm:num_preemptions_total", 0.0) > 0, "meant to force preemption"
    finally:
        server.stop()


def test_hybrid_layers_hold_state_not_kv(tmp_path):
    """Qwen3-Next's Gated DeltaNet layers hold no K/V: the worker tells vLLM about its attention
    layers only, and reserves per request exactly the state mlx-lm's own caches hold for one
    sequence (conv window and recurrence matrix of each linear layer)."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, make_prompt_cache
    from mlx_lm.utils import load_config, load_model

    spec = tiny.BY_NAME["qwen3_next"]
    path = tiny.build(spec, tmp_path / spec.name)
    worker = metal_worker(path, dtype="float32", max_model_len=256, num_blocks=16, block_size=16)
    kinds = spec.config["layer_types"]
    assert list(worker.get_kv_cache_spec()) == [
        f"model.layers.{i}.self_attn" for i, kind in enumerate(kinds) if kind == "full_attention"]
    model, _ = load_model(path, model_config=mlx_lm_models.prepare_mlx_lm(load_config(path)))
    caches = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=caches))
    state = sum(a.nbytes for c in caches if isinstance(c, ArraysCache) for a in c.cache)
    assert state > 0 and worker.model_runner.state_bytes_per_request() == state
    worker.shutdown()


def test_sliding_window_layers_hold_only_their_window(tmp_path):
    """Gemma 3's local layers hold only their window: the worker gives them vLLM's sliding-window
    spec, so vLLM frees their blocks behind the window, and a KV budget of half what one
    full-length request would need with every layer full attention (6 layers x 16 blocks) serves
    one (the global layer's 16 blocks, each local layer's window and a prefill chunk), with
    transformers' tokens."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    spec = tiny.BY_NAME["gemma3"]
    path = tiny.build(spec, tmp_path / spec.name)
    worker = metal_worker(path, dtype="float32", max_model_len=256, num_blocks=16, block_size=16)
    kinds = [type(s) for s in worker.get_kv_cache_spec().values()]
    worker.shutdown()
    assert kinds == [SlidingWindowSpec] * 5 + [FullAttentionSpec]
    page = 16 * 2 * spec.config["num_key_value_heads"] * spec.config["head_dim"] * 4
    prompt = _prompts(path)[2]
    server = VllmServer(path, ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "2",
                               "--max-num-batched-tokens", str(STEP_TOKENS), "--seed", "0",
                               "--kv-cache-memory-bytes", str(48 * page)], name="gemma3-windows")
    try:
        assert completion_tokens(server, prompt, N_NEW) == hf_greedy(path, prompt, N_NEW)
    finally:
        server.stop()


def test_supported_models_doc_matches_this_run():
    """docs/supported_models.md must say what this run proved for every architecture it ran."""
    if not RESULTS:
        pytest.skip("no architecture ran in this session")
    doc_path = ROOT / "docs" / "supported_models.md"
    assert doc_path.exists(), "docs/supported_models.md is missing: run scripts/gen_supported_models.py"
    doc = doc_path.read_text()
    for name, row in RESULTS.items():
        line = gen_supported_models.table_row(row)
        assert line in doc, (
            f"{name}: docs/supported_models.md is stale; regenerate it with "
            f"`python scripts/gen_supported_models.py` (expected row: {line})"
        )
