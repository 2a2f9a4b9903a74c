"""Quantized MLX checkpoints as ``mlx_lm.convert`` writes them: 4 and 8 bits, group sizes 32, 64
and 128, load packed and generate exactly mlx-lm's own greedy tokens on the same checkpoint.

MLX's quantized matmul runs every (bits, group) the same way, so the six combinations (fp32) and
the usual mlx-community form (bf16 scales, served in bf16) are checked in-process on a tiny
random llama (dims divisible by 128) through the runner's public contract (SchedulerOutput in,
sampled tokens out). One live ``vllm serve`` covers real weights at 8 bits, group 32
(``test_parity`` serves the 4-bit group-64 checkpoint). Real weights in bf16 are left to the
in-process case: MLX's CPU backend runs bf16 about 50x slower than fp32 (minutes per test here).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import VllmServer, completion_tokens, metal_worker, runner_step
from references import mlx_greedy, prompt_ids

from fixtures.tiny import write_llama

BLOCK = 16
COMBOS = list(itertools.product((4, 8), (32, 64, 128)))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, models) -> Path:
    """A 2-layer random llama whose every matrix dimension divides by 128, SmolLM2's vocabulary.

    std 0.2 instead of the usual 0.02: random logits that close together make greedy decoding
    a coin toss between near-tied tokens, and the comparison would prove little."""
    config = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return write_llama(tmp_path_factory.mktemp("tiny-llama-hf"), config, models.hf)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_hf) -> dict[tuple[int, int], Path]:
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("tiny-llama-mlx")
    out = {}
    for bits, group in COMBOS:
        path = root / f"q{bits}-g{group}"
        convert(str(tiny_hf), str(path), quantize=True, q_bits=bits, q_group_size=group)
        out[bits, group] = path
    return out


def _worker(model_dir: Path, dtype: str = "float32"):
    return metal_worker(model_dir, dtype=dtype, max_model_len=256, num_blocks=32, block_size=BLOCK)


def _step(worker, scheduled: dict[str, int], new=(), cached=None, finished=()):
    """One hand-built step (see conftest.runner_step): request id -> the tokens it sampled."""
    out = runner_step(worker, scheduled, new=new, cached=cached, finished=finished)
    return dict(zip(out.req_ids, out.sampled_token_ids, strict=True))


def assert_greedy_is_mlx_lms(worker, path: Path, models, check) -> None:
    """``check(worker.model_runner)``, then two short prompts' 8 greedy tokens from the runner (batched)
    equal ``mlx_lm``'s on ``path``; the worker is shut down either way."""
    try:
        check(worker.model_runner)
        prompts = [p for p in prompt_ids(models.hf) if len(p) < 64][:2]
        got = runner_greedy(worker, prompts, 8)
    finally:
        worker.shutdown()
    for p, tokens in zip(prompts, got, strict=True):
        assert tokens == mlx_greedy(path, p, 8)


def runner_greedy(worker, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuations of ``prompts``, batched: one prefill step for all, then decode steps."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData

    ids = [f"r{i}" for i in range(len(prompts))]
    per_req = -(-(max(map(len, prompts)) + n) // BLOCK)
    new = [NewRequestData(req_id=r, prompt_token_ids=p, mm_features=[],
                          sampling_params=SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                          pooling_params=None, block_ids=(list(range(1 + i * per_req, 1 + (i + 1) * per_req)),),
                          num_computed_tokens=0, lora_request=None)
           for i, (r, p) in enumerate(zip(ids, prompts, strict=True))]
    got = _step(worker, {r: len(p) for r, p in zip(ids, prompts, strict=True)}, new=new)
    for k in range(1, n):
        cached = CachedRequestData(
            req_ids=ids, resumed_req_ids=set(), new_token_ids=[[] for _ in ids], all_token_ids={},
            new_block_ids=[None for _ in ids], num_computed_tokens=[len(p) + k - 1 for p in prompts],
            num_output_tokens=[k for _ in ids])
        for r, tokens in _step(worker, {r: 1 for r in ids}, cached=cached).items():
            got[r] = got[r] + tokens
    _step(worker, {}, finished=ids)
    return [got[r] for r in ids]


@pytest.mark.parametrize(("bits", "group"), COMBOS, ids=[f"{b}bit-g{g}" for b, g in COMBOS])
def test_runner_matches_mlx_lm(converted, models, bits, group):
    import mlx.nn as nn

    path = converted[bits, group]
    written = json.loads((path / "config.json").read_text())["quantization"]
    assert (written["bits"], written["group_size"]) == (bits, group)

    def packed_as_written(runner) -> None:
        packed = [m for _, m in runner.loaded.model.named_modules()
                  if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
        assert len(packed) == 2 * 7 + 2 and {(m.bits, m.group_size) for m in packed} == {(bits, group)}

    assert_greedy_is_mlx_lms(_worker(path), path, models, packed_as_written)


def test_packed_quantized_layers_give_each_row_its_own_product():
    """``fold_quantized_rows`` (the packed step's quantized matmuls take its (T, 1, K) rows as one
    matrix): each row's output is that row's own product, shapes and parameters are unchanged."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from vllm_metal.mlx_lm_models import fold_quantized_rows

    model = nn.Module()
    model.proj = nn.Linear(256, 384, bias=True)
    model.embed = nn.Embedding(512, 256)
    nn.quantize(model, group_size=64, bits=4)
    before = dict(tree_flatten(model.parameters()))
    assert fold_quantized_rows(model) == 2
    assert dict(tree_flatten(model.parameters())).keys() == before.keys()
    x = mx.random.normal((9, 1, 256), key=mx.random.key(0))
    for product in (model.proj, model.embed.as_linear):
        packed = product(x)
        rows = mx.concatenate([product(x[i:i + 1]) for i in range(x.shape[0])])
        assert packed.shape == rows.shape == (9, 1, product(x[:1]).shape[-1])
        assert mx.allclose(packed, rows, rtol=1e-5, atol=1e-5).item()


def test_dequantized_products_match_quantized_ones():
    """``dequantize_large_products``: from its row count on, a packed quantized layer's product is
    the dense product with the dequantized weight, equal to the quantized kernel's up to rounding;
    below it the quantized kernel runs, and rows=0 turns it off."""
    import mlx.nn as nn

    from vllm_metal.mlx_lm_models import dequantize_large_products, fold_quantized_rows

    model = nn.Module()
    model.proj = nn.Linear(256, 384, bias=True)
    nn.quantize(model, group_size=64, bits=4)
    fold_quantized_rows(model)
    x = mx.random.normal((9, 1, 256), key=mx.random.key(1))
    quantized = model.proj(x)
    assert dequantize_large_products(model, 9) == 1
    dense = model.proj(x)
    assert dense.shape == quantized.shape
    assert mx.allclose(dense, quantized, rtol=1e-4, atol=1e-4).item()
    assert mx.allclose(model.proj.dense_product(x), quantized, rtol=1e-4, atol=1e-4).item()
    assert mx.array_equal(model.proj(x[:8]), quantized[:8]).item()  # 8 rows: below the bound
    dequantize_large_products(model, 0)
    assert mx.array_equal(model.proj(x), quantized).item()


def test_runner_with_dequantized_products_matches_mlx_lm(converted, models, monkeypatch):
    """VLLM_METAL_DEQUANTIZE_ROWS=2: every batched step of two sequences (their prefill, each decode
    step) runs the dense products; greedy tokens stay mlx-lm's."""
    monkeypatch.setenv("VLLM_METAL_DEQUANTIZE_ROWS", "2")
    path = converted[4, 64]

    def dense_from_two_rows(runner) -> None:
        from vllm_metal.mlx_lm_models import PackedQuantizedLinear

        layers = [m for _, m in runner.loaded.model.named_modules() if isinstance(m, PackedQuantizedLinear)]
        assert len(layers) == 2 * 7 + 1 and {m.dequantize_rows for m in layers} == {2}

    assert_greedy_is_mlx_lms(_worker(path), path, models, dense_from_two_rows)


@pytest.fixture(scope="module")
def bf16_q4(tmp_path_factory, tiny_hf) -> Path:
    """mlx-community's form: 4 bits, group 64, non-quantized weights and scales in bf16."""
    from mlx_lm import convert

    path = tmp_path_factory.mktemp("tiny-llama-bf16") / "q4-g64-bf16"
    convert(str(tiny_hf), str(path), quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16")
    return path


def test_bf16_checkpoint_at_bf16_matches_mlx_lm(bf16_q4, models):
    """mlx-community's form served in bf16 (what ``--dtype auto`` picks on a GPU; on MLX's CPU
    backend auto is float32, so it is given here): the plugin keeps the checkpoint's scales as
    they are and runs mlx-lm's arithmetic."""

    def computes_in_bf16(runner) -> None:
        assert runner.loaded.dtype == mx.bfloat16

    assert_greedy_is_mlx_lms(_worker(bf16_q4, dtype="bfloat16"), bf16_q4, models, computes_in_bf16)


def test_quantized_kernel_on_cuda_or_refused(bf16_q4, models, monkeypatch):
    """VLLM_METAL_QUANTIZED_KERNEL=on: on MLX's CUDA GPU, greedy tokens with every 4-bit product in
    the kernel (the 2 x 7 layers and the LM head) stay mlx-lm's; elsewhere startup is refused,
    naming the variable and what to set instead."""
    from vllm_metal import quant_kernel
    from vllm_metal.mlx_lm_models import UnsupportedModelError

    monkeypatch.setenv("VLLM_METAL_QUANTIZED_KERNEL", "on")
    if not quant_kernel.on_cuda():
        with pytest.raises(UnsupportedModelError, match="VLLM_METAL_QUANTIZED_KERNEL=on needs MLX on an NVIDIA"):
            _worker(bf16_q4, dtype="bfloat16")
        return

    def every_layer_in_the_kernel(runner) -> None:
        layers = [m for _, m in runner.loaded.model.named_modules() if getattr(m, "kernel", False)]
        assert len(layers) == 2 * 7 + 1

    assert_greedy_is_mlx_lms(_worker(bf16_q4, dtype="bfloat16"), bf16_q4, models, every_layer_in_the_kernel)


@pytest.fixture(scope="module")
def smollm2_8bit(tmp_path_factory, models) -> Path:
    from mlx_lm import convert

    path = tmp_path_factory.mktemp("smollm2-8bit") / "model"
    convert(str(models.hf), str(path), quantize=True, q_bits=8, q_group_size=32)
    return path


def test_serve_8bit_checkpoint_matches_mlx_lm(smollm2_8bit, models):
    """Real weights, 8 bits, group 32, through ``vllm serve``; --dtype float32 because the
    checkpoint keeps fp32 scales (as converted from the fp32 HF checkpoint)."""
    srv = VllmServer(smollm2_8bit, ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
                                    "--kv-cache-memory-bytes", str(64 * 2**20)], name="mlx8bit")
    try:
        for p in [prompt_ids(models.hf)[i] for i in (0, 7)]:
            assert completion_tokens(srv, p, 12) == mlx_greedy(smollm2_8bit, p, 12)
    finally:
        srv.stop()
