"""GGUF files served directly (``vllm serve model.gguf``), with quantized blocks kept quantized.

* every supported block type converts to MLX affine quantization exactly (max abs difference 0
  against gguf-py's own dequantization), on synthetic blocks and on every tensor of the bundled
  SmolLM2 Q4_1 file, where the packed arrays also equal MLX's own GGUF reader's;
* tiny llama/qwen2/qwen3 files mixing all those types give the logits transformers computes from
  the same file (this pins the tensor-name map, llama.cpp's q/k row permutation and Llama 3's
  ``rope_freqs``);
* types with no exact MLX form, other architectures and split files are refused before loading,
  naming the tensors and type; a file without a tokenizer asks for --tokenizer;
* the resident model stays near the file's size;
* a live ``vllm serve SmolLM2-135M-Instruct.Q4_1.gguf`` produces exactly the greedy tokens of
  transformers (fp32) on the HF checkpoint dequantized from that same file.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import SERVER_DEVICE, VllmServer, completion_tokens
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from mlx.utils import tree_map
from references import prompt_ids, tokenizer

from vllm_metal.device import configured_device, resolve_device
from vllm_metal.gguf import GgufError, ensure_view
from vllm_metal.gguf.blocks import UnsupportedQuantError, to_affine
from vllm_metal.gguf.reader import GgufFile

LEGACY = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)  # gguf-py can quantize these
K_QUANTS = (Q.Q4_K, Q.Q5_K)
ALL_TYPES = (*LEGACY, *K_QUANTS, Q.F16)


def _raw(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """GGUF rows of ``qtype``: gguf-py's quantizer where it has one, else random blocks with
    small valid float16 d/dmin (every other byte pattern is a valid K-quant block)."""
    if qtype in LEGACY:
        return quantize((rng.standard_normal((rows, cols)) * 0.08).astype(np.float32), qtype)
    elems, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // elems, size), dtype=np.uint8)
    raw[..., 0:4] = rng.uniform(1e-4, 4e-4, size=(rows, cols // elems, 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _mlx_dequantized(a) -> np.ndarray:
    """What MLX computes from the converted tensor, with scales widened to fp32 (exact)."""
    w = mx.dequantize(mx.array(a.weight), mx.array(a.scales.astype(np.float32)),
                      mx.array(a.biases.astype(np.float32)), group_size=a.group_size, bits=a.bits)
    return np.array(w)


@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS, ids=lambda q: q.name)
def test_block_conversion_is_exact(qtype):
    raw = _raw(np.random.default_rng(int(qtype)), qtype, 16, 512)
    affine = to_affine(qtype, raw, 512)
    assert np.array_equal(_mlx_dequantized(affine), dequantize(raw, qtype))
    # The legacy types keep the file's float16 scales, so --dtype float16 holds them exactly;
    # K-quant sub-block scales (d * 6-bit scale) need float32.
    assert affine.scales.dtype == (np.float16 if qtype in LEGACY else np.float32)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q6_K, Q.IQ4_NL, Q.IQ2_XS, Q.TQ1_0], ids=lambda q: q.name)
def test_inexact_types_are_refused(qtype):
    elems, size = GGML_QUANT_SIZES[qtype]
    with pytest.raises(UnsupportedQuantError, match=qtype.name):
        to_affine(qtype, np.zeros((4, 2 * size), np.uint8), 2 * elems)


@pytest.fixture(scope="module")
def real_reader(models) -> GGUFReader:
    """gguf-py's reader of the bundled file: the independent reference (slow: ~5 s to build)."""
    return GGUFReader(str(models.gguf))


def test_index_matches_gguf_py(real_reader, models):
    """The plugin's one-pass header reader finds the same tensors, types, shapes and bytes."""
    mine = GgufFile(models.gguf)
    assert [(t.name, t.qtype, t.dims, t.offset) for t in mine.tensors] == \
        [(t.name, t.tensor_type, tuple(int(d) for d in t.shape), t.data_offset) for t in real_reader.tensors]
    for t, ref in zip(mine.tensors, real_reader.tensors, strict=True):
        assert np.array_equal(mine.data(t), ref.data), t.name
    for key in ("general.architecture", "llama.rope.freq_base", "tokenizer.ggml.eos_token_id"):
        assert mine.metadata[key] == real_reader.fields[key].contents()
    assert mine.metadata["tokenizer.ggml.tokens"] == len(real_reader.fields["tokenizer.ggml.tokens"].data)


def test_real_file_converts_exactly(real_reader, models):
    """Every quantized tensor of the bundled file: exact, and bit-identical to the packed arrays
    MLX's own GGUF reader (``mx.load``, which handles Q4_0/Q4_1/Q8_0) produces."""
    reader = real_reader
    native = mx.load(str(models.gguf))
    quantized = [t for t in reader.tensors if t.tensor_type not in (Q.F32, Q.F16)]
    assert {t.tensor_type for t in quantized} == {Q.Q4_1, Q.Q8_0}, "the file this test is about"
    for t in quantized:
        affine = to_affine(t.tensor_type, t.data, int(t.shape[0]))
        assert np.array_equal(_mlx_dequantized(affine), dequantize(t.data, t.tensor_type)), t.name
        base = t.name.removesuffix(".weight")
        for mine, theirs in ((affine.weight, "weight"), (affine.scales, "scales"), (affine.biases, "biases")):
            assert np.array_equal(mine, np.array(native[f"{base}.{theirs}"])), f"{t.name} {theirs}"


# ----------------------------------------------------------------------------------------------
# Tiny synthetic files: every supported type, three architectures
# ----------------------------------------------------------------------------------------------

TINY = {"llama": dict(heads=4, kv=2, head_dim=64, tied=False),
        "qwen2": dict(heads=4, kv=2, head_dim=64, tied=True),
        # Qwen3's head_dim is set apart from hidden / heads; 128 is also transformers' default,
        # which its GGUF config reader falls back to.
        "qwen3": dict(heads=2, kv=1, head_dim=128, tied=True)}
HIDDEN, FFN, LAYERS, VOCAB = 256, 512, 2, 49152


def write_tiny_gguf(path: Path, arch: str, types=ALL_TYPES, heads=4, kv=2, head_dim=64,
                    tied=True, seed=0, rope_freqs: np.ndarray | None = None) -> Path:
    """A 2-layer ``arch`` file as llama.cpp lays it out, linear weights cycling through
    ``types``; no tokenizer in it (serving it needs --tokenizer)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(LAYERS)
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    cycle = iter(list(types) * 64)

    def linear(name: str, rows: int, cols: int) -> None:
        qtype = next(cycle)
        if qtype in (Q.F16, Q.F32):
            dense = rng.standard_normal((rows, cols)) * 0.08
            w.add_tensor(name, dense.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            w.add_tensor(name, _raw(rng, qtype, rows, cols), raw_dtype=qtype)

    def vector(name: str, n: int, base: float = 1.0) -> None:
        w.add_tensor(name, (base + 0.1 * rng.standard_normal(n)).astype(np.float32))

    embed = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32)
    w.add_tensor("token_embd.weight", quantize(embed, Q.Q8_0), raw_dtype=Q.Q8_0)
    for i in range(LAYERS):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", HIDDEN)
        vector(p + "ffn_norm.weight", HIDDEN)
        linear(p + "attn_q.weight", heads * head_dim, HIDDEN)
        linear(p + "attn_k.weight", kv * head_dim, HIDDEN)
        linear(p + "attn_v.weight", kv * head_dim, HIDDEN)
        linear(p + "attn_output.weight", HIDDEN, heads * head_dim)
        linear(p + "ffn_gate.weight", FFN, HIDDEN)
        linear(p + "ffn_up.weight", FFN, HIDDEN)
        linear(p + "ffn_down.weight", HIDDEN, FFN)
        if arch == "qwen2":
            for n, rows in (("attn_q", heads * head_dim), ("attn_k", kv * head_dim), ("attn_v", kv * head_dim)):
                vector(p + n + ".bias", rows, base=0.0)
        if arch == "qwen3":
            vector(p + "attn_q_norm.weight", head_dim)
            vector(p + "attn_k_norm.weight", head_dim)
    vector("output_norm.weight", HIDDEN)
    if not tied:
        linear("output.weight", VOCAB, HIDDEN)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Views of throwaway files go to a throwaway model cache."""
    monkeypatch.setenv("VLLM_METAL_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits_agree(got: np.ndarray, want: np.ndarray) -> bool:
    """fp32 accumulation-order noise (~1e-5 of the logit scale here) passes; a wrong name map,
    q/k permutation or rope moves logits by about the logit scale itself."""
    return np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def _plugin_model_fp32(gguf_file: Path):
    """The model vllm-metal's loader builds from the file, at --dtype float32."""
    from mlx_lm.utils import load_config

    from vllm_metal.gguf.weights import load_model
    from vllm_metal.mlx_lm_models import prepare_mlx_lm

    view = ensure_view(gguf_file)
    model, _ = load_model(view, prepare_mlx_lm(load_config(view)))
    model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))
    return model


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_file_matches_transformers(tmp_path, cache, arch):
    """Logits of the packed MLX model vs transformers' fp32 model dequantized from the same file:
    fp32 accumulation noise only (a wrong name map or q/k permutation moves them by ~100)."""
    import mlx.nn as nn
    from transformers import AutoModelForCausalLM, GgufConfig

    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, **TINY[arch])
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                              quantization_config=GgufConfig(dequantize=True)).eval()
    ids = [1, 502, 3000, 77, 9000, 1234, 42, 17, 3, 999, 20000, 40000]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    model = _plugin_model_fp32(path)
    got = np.array(model(mx.array([ids]))[0])
    assert _logits_agree(got, want), np.abs(got - want).max()
    packed = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert {(m.bits, m.group_size) for m in packed} == {(4, 32), (5, 32), (8, 32)}
    n_linear = LAYERS * 7 + (0 if TINY[arch]["tied"] else 1)
    assert len(packed) == 1 + n_linear - sum(1 for i in range(n_linear) if ALL_TYPES[i % len(ALL_TYPES)] == Q.F16)


def _llama3_rope_factors(base: float, dim: int, factor: float, low_freq_factor: float,
                         high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """``rope_freqs`` as llama.cpp's converter writes it for a Llama 3.x checkpoint."""
    low, high = original_max_position_embeddings / low_freq_factor, original_max_position_embeddings / high_freq_factor
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * np.pi * base ** (i / dim)
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_factors_match_transformers(tmp_path, cache):
    """Llama 3.x files carry their rope scaling only as ``rope_freqs``; the plugin applies it and
    matches transformers' llama3 rope. (An original context of 16 makes it matter at 36 tokens.)"""
    from transformers import AutoModelForCausalLM, GgufConfig

    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    path = write_tiny_gguf(tmp_path / "llama3.gguf", "llama", **TINY["llama"],
                           rope_freqs=_llama3_rope_factors(10000.0, 64, **scaling))
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True),
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, **scaling}).eval()
    ids = [1, 502, 3000, 77, 9000, 1234, 42, 17, 3, 999, 20000, 40000] * 3
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = np.array(_plugin_model_fp32(path)(mx.array([ids]))[0])
    assert _logits_agree(got, want), np.abs(got - want).max()


def test_inexact_file_is_refused_before_loading(tmp_path, cache):
    """vLLM's own config path (EngineArgs -> the platform's GGUF resolver) stops at the first
    look at the file, naming the tensors and the type."""
    from vllm.engine.arg_utils import EngineArgs

    path = write_tiny_gguf(tmp_path / "q6k.gguf", "qwen2", types=(Q.Q8_0, Q.Q4_K, Q.Q6_K))
    with pytest.raises(GgufError, match=r"Q6_K \(blk\.0\.attn_v\.weight.*16-element"):
        EngineArgs(model=str(path), max_model_len=256).create_engine_config()


def test_other_architectures_and_split_files_are_refused(tmp_path, cache):
    w = GGUFWriter(str(tmp_path / "phi3.gguf"), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GgufError, match="architecture 'phi3' is not supported"):
        ensure_view(tmp_path / "phi3.gguf")
    w = GGUFWriter(str(tmp_path / "shard-00001-of-00002.gguf"), "llama")
    w.add_uint16("split.count", 2)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GgufError, match="split GGUF"):
        ensure_view(tmp_path / "shard-00001-of-00002.gguf")


def test_tokenizer_needed_only_when_file_has_none(tmp_path, cache, models):
    from vllm.engine.arg_utils import EngineArgs

    path = write_tiny_gguf(tmp_path / "notok.gguf", "qwen3", **TINY["qwen3"])
    with pytest.raises(GgufError, match="--tokenizer"):
        EngineArgs(model=str(path), max_model_len=256).create_engine_config()
    cfg = EngineArgs(model=str(path), tokenizer=str(models.hf), max_model_len=256).create_engine_config()
    mc = cfg.model_config
    assert mc.served_model_name == str(path) and mc.tokenizer == str(models.hf)
    assert mc.hf_config.head_dim == 128 and mc.architectures == ["Qwen3ForCausalLM"]
    # "auto": float32 where MLX computes on the CPU (no fast half-precision kernels there), else
    # the file's float16 block scales
    assert mc.dtype == (torch.float16 if configured_device() == "gpu" else torch.float32)


def test_view_tokenizer_matches_hf(models):
    """Without --tokenizer the bundled file's own tokenizer (rebuilt by transformers) is used:
    same ids and chat template as the HF checkpoint's."""
    from transformers import AutoTokenizer

    from_file = AutoTokenizer.from_pretrained(str(ensure_view(models.gguf)))
    hf = tokenizer(models.hf)
    assert from_file.chat_template == hf.chat_template and from_file.eos_token_id == hf.eos_token_id
    chat = [{"role": "user", "content": "Give me three tips for writing clear code."}]
    assert from_file.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    for text in ("The capital of France is", "def f(x):\n    return x ** 2  # ünïcödé"):
        assert from_file(text)["input_ids"] == hf(text)["input_ids"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_resident_model_stays_near_file_size(real_reader, models, dtype):
    """No dense blow-up: the loaded model (the loader's own weight count) is within 1.3x of the
    file's tensor bytes, and every linear layer and the embedding stay packed."""
    import mlx.nn as nn

    from vllm_metal.loader import load

    file_bytes = sum(int(t.n_bytes) for t in real_reader.tensors)
    loaded = load(ensure_view(models.gguf), dtype)
    ratio = loaded.weight_bytes / file_bytes
    print(f"{dtype}: {loaded.weight_bytes / 2**20:.1f} MiB resident for {file_bytes / 2**20:.1f} MiB "
          f"of GGUF tensors ({ratio:.3f}x)")
    assert ratio <= 1.3
    modules = [m for _, m in loaded.model.named_modules()]
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in modules)
    assert sum(isinstance(m, nn.QuantizedLinear) for m in modules) == 30 * 7


# ----------------------------------------------------------------------------------------------
# Live server
# ----------------------------------------------------------------------------------------------

N_NEW = 16


@pytest.fixture(scope="module")
def gguf_server(models):
    # Served the obvious way, without --dtype, where MLX computes on the CPU (auto is float32
    # there); float32 on a GPU, for parity with transformers' float32.
    dtype = ["--dtype", "float32"] if resolve_device(SERVER_DEVICE) == "gpu" else []
    srv = VllmServer(models.gguf, ["--tokenizer", str(models.hf), *dtype, "--max-model-len", "1024",
                                   "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(64 * 2**20)],
                     name="gguf")
    yield srv
    srv.stop()


@functools.cache
def _hf_model(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def hf_greedy_choices(hf_dir: Path, prompt: list[int], tokens: list[int]) -> list[int]:
    """transformers' argmax after ``prompt + tokens[:t]`` for every t, from one fp32 forward pass:
    equal to ``tokens`` exactly when ``tokens`` is its greedy continuation (the step-by-step
    loop of ``references.hf_greedy`` gives the same answer at N times the cost)."""
    with torch.no_grad():
        logits = _hf_model(hf_dir)(torch.tensor([prompt + tokens[:-1]])).logits[0]
    return logits[len(prompt) - 1:].argmax(-1).tolist()


def test_serve_gguf_matches_hf_checkpoint_of_same_file(gguf_server, models):
    """Seven parity prompts at once (the > 300-token one, whose prefill costs twice the rest
    together, is test_parity's job): the packed Q4_1/Q8_0 model's greedy tokens equal
    transformers fp32 on the checkpoint that transformers dequantized from the same file."""
    import httpx

    served = httpx.get(f"{gguf_server.url}/models", timeout=30).json()["data"]
    assert [m["id"] for m in served] == [str(models.gguf)]
    prompts = [p for p in prompt_ids(models.hf) if len(p) < 300]
    assert len(prompts) == 7
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: completion_tokens(gguf_server, p, N_NEW), prompts))
    for i, p in enumerate(prompts):
        assert len(got[i]) == N_NEW and got[i] == hf_greedy_choices(models.hf, p, got[i]), f"prompt {i}"
