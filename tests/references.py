"""Reference greedy generators on the same weights: HF transformers (fp32) and mlx-lm."""

from __future__ import annotations

import functools
import json
from pathlib import Path

LONG_TEXT = (
    "The history of computing is a story of layered abstractions. Early machines were programmed "
    "by rewiring panels; stored-program computers let instructions live in memory beside data; "
    "assemblers named the instructions; compilers translated structured languages into them; "
    "operating systems shared one machine among many programs; networks joined machines; and the "
    "web joined documents. Each layer hid the one below it, and each made new kinds of software "
    "possible that nobody had planned for. "
) * 4

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "Q: What is the boiling point of water at sea level?\nA:",
    "1, 2, 3, 5, 8, 13,",
    "Translate to French: 'Good morning, how are you?'\nFrench:",
    LONG_TEXT + "\nSummary in one sentence:",
]
CHAT = [{"role": "user", "content": "Give me three tips for writing clear code."}]


@functools.cache
def tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def prompt_ids(hf_dir: Path) -> list[list[int]]:
    """Token ids of the 8 parity prompts: 7 plain (one > 300 tokens) and one chat-templated."""
    tok = tokenizer(hf_dir)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ids.append(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False))
    return [list(map(int, x)) for x in ids]


@functools.cache
def _hf_model(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from fixtures.tiny import TRANSFORMERS_LOCK

    # transformers' SDPA attention drops Gemma 2's attn_logit_softcapping; its eager one applies it.
    capped = json.loads((hf_dir / "config.json").read_text()).get("attn_logit_softcapping")
    kwargs = {"attn_implementation": "eager"} if capped else {}
    with TRANSFORMERS_LOCK:  # test_models builds tiny checkpoints in threads meanwhile
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, **kwargs)
    return model.eval()


def hf_greedy(hf_dir: Path, ids: list[int], n: int) -> list[int]:
    """HF transformers fp32 greedy continuation of exactly ``n`` tokens.

    A plain argmax loop over the KV cache: like ``ignore_eos`` on the server, an EOS token is
    generated and then continued past, not suppressed (``min_new_tokens`` would suppress it).
    """
    import torch

    model = _hf_model(hf_dir)
    out: list[int] = []
    with torch.no_grad():
        step = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(step.logits[0, -1].argmax())
            out.append(token)
            step = model(torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True)
    return out


def hf_logprobs(hf_dir: Path, ids: list[int], continuation: list[int]) -> list[float]:
    """HF transformers fp32 log-probability of each ``continuation`` token after ``ids`` and the
    tokens before it (the model's raw distribution: no temperature)."""
    import torch

    model = _hf_model(hf_dir)
    with torch.no_grad():
        logits = model(torch.tensor([ids + continuation])).logits[0, len(ids) - 1 : -1]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return [float(logprobs[i, t]) for i, t in enumerate(continuation)]


@functools.cache
def _mlx_model(mlx_dir: Path, adapter: Path | None = None):
    from mlx_lm import load

    return load(str(mlx_dir), adapter_path=None if adapter is None else str(adapter))


def mlx_greedy(mlx_dir: Path, ids: list[int], n: int, adapter: Path | None = None) -> list[int]:
    """mlx-lm greedy continuation of exactly ``n`` tokens (its own generate_step, no EOS stop),
    with an mlx-lm LoRA adapter loaded as mlx-lm loads it where ``adapter`` is given."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, _ = _mlx_model(mlx_dir, adapter)
    out = []
    for token, _ in generate_step(mx.array(ids), model, max_tokens=n):
        out.append(int(token))
    return out


def hf_embedding(hf_dir: Path, ids: list[int]) -> list[float]:
    """HF transformers fp32: the last token's final (normed) hidden state, L2-normalised, which is
    vLLM's embedding of a causal LM under ``--runner pooling`` (last-token pooling, normalize)."""
    import torch

    with torch.no_grad():
        hidden = _hf_model(hf_dir).model(torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden, dim=-1).tolist()
