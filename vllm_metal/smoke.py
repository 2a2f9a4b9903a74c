"""The doctor's smoke check: a tiny random llama generated through vLLM and compared with mlx-lm.

``python -m vllm_metal doctor --smoke`` runs it on a user's machine, without a checkout or a
download: the checkpoint is built here, in a temporary directory, from a fixed seed.
``random_llama`` is the project's one random-llama builder; the test fixtures call it with their
own configs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    # Wider than transformers' 0.02: a 64-wide model at 0.02 puts nearly the same logit on every
    # token, and greedy decoding would pick between near-ties.
    "initializer_range": 0.2,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
PROMPT = [1, 17, 42, 99, 7]
NEW_TOKENS = 4


def random_llama(config: dict[str, Any], seed: int = 0) -> LlamaForCausalLM:
    """A fp32 ``LlamaForCausalLM`` of ``config`` with transformers' random init under ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32)


def write_tiny_llama(path: Path) -> Path:
    """The smoke's 2-layer llama (HF config + safetensors, no tokenizer) in ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    random_llama(TINY_LLAMA).save_pretrained(path)
    return path


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def smoke() -> list[int]:
    """Generate greedy tokens from the tiny llama through vLLM + the plugin; check vs mlx-lm."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model
    from vllm import LLM, SamplingParams

    # The checkpoint has no tokenizer on purpose (token ids in, token ids out); vLLM's renderer
    # still tries a chat-template warm-up and an EOS lookup and warns about both, and an
    # in-process engine warns that its seed sets this process's random state. Those warnings
    # describe the smoke's own setup, so they are dropped while it runs.
    quiet = {"vllm.renderers.base": _BelowError(), "vllm.engine.arg_utils": _BelowError()}
    for name, f in quiet.items():
        logging.getLogger(name).addFilter(f)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_tiny_llama(Path(tmp) / "tiny-llama")
            llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=128,
                      max_num_seqs=2, kv_cache_memory_bytes=16 * 2**20)
            params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
            out = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
            got = list(out[0].outputs[0].token_ids)
            model, _ = load_model(model_dir)
            want = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=NEW_TOKENS)]
    finally:
        for name, f in quiet.items():
            logging.getLogger(name).removeFilter(f)
    if got != want:
        raise SystemExit(f"smoke test FAILED: vllm-metal {got} != mlx-lm {want}")
    return got
