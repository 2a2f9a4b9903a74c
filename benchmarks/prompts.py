"""Fixed, deterministic prompts and the request body every system receives.

Every system gets byte-identical request bodies (same messages, greedy, same ``max_tokens``, same
``logit_bias``), so differences in the numbers come from the servers, not from the requests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# The seed's protocol: 3 prompts, each run 3 times per max_tokens value. Open-ended writing tasks,
# so that even without EOS suppression the model has a reason to keep going.
PROTOCOL_PROMPTS: tuple[str, ...] = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the characters, the setting and every event in detail.",
    "Explain in depth how a computer processor executes a program, from fetching instructions to "
    "writing results back to memory. Cover pipelining, caches and branch prediction.",
    "Write a comprehensive guide to growing vegetables in a small garden, season by season, with "
    "practical tips on soil, watering, pests and harvesting.",
)

_TOPICS = (
    "volcanoes", "the history of the printing press", "how vaccines work", "black holes",
    "the water cycle", "medieval castles", "machine learning", "coral reefs",
    "the Roman Empire", "electric cars", "honey bees", "the stock market",
    "photosynthesis", "jazz music", "the Moon landing", "plate tectonics",
)
_CONTEXT = (
    "Background: scientists, historians and engineers have studied this subject for a long time. "
    "Their findings are spread across many books, lectures and articles, and different authors "
    "often stress different aspects: causes and effects, the people involved, the technology, "
    "the economics and the open questions that remain. A good explanation connects these views. "
)


SWEEP_PROMPTS = 64


def sweep_prompts(n: int = SWEEP_PROMPTS) -> list[str]:
    """``n`` prompts of mixed length (about 10 to 400 tokens), the same list on every call."""
    styles = (
        lambda t: f"Tell me about {t}.",
        lambda t: f"Write a short essay about {t} for a curious teenager. Use simple words and "
        "give two concrete examples.",
        lambda t: _CONTEXT * 2 + f"Question: explain {t} to a new student, step by step.",
        lambda t: _CONTEXT * 6 + f"Task: summarise everything important about {t}, then list "
        "three common misconceptions and correct each one.",
    )
    prompts = [style(topic) for topic in _TOPICS for style in styles]
    random.Random(0).shuffle(prompts)  # mix lengths within any prefix of the list
    return [prompts[i % len(prompts)] for i in range(n)]


def write_jsonl(prompts: list[str], path: Path) -> Path:
    """The prompt set as ``vllm bench serve --dataset-name custom`` reads it."""
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def eos_logit_bias(hf_dir: Path) -> dict[str, float]:
    """logit_bias -100 on every special token (EOS, turn markers) of the model's tokenizer.

    Not every peer honours vLLM's ``ignore_eos`` (mlx_lm.server and llama.cpp's Python server do
    not), but all of them honour OpenAI's ``logit_bias``: with EOS and turn markers suppressed
    under greedy decoding, every system generates exactly ``max_tokens`` tokens of plain text.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = {tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values() if t.special}
    config = json.loads((hf_dir / "config.json").read_text())
    eos = config.get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return {str(i): -100.0 for i in sorted(i for i in ids if i is not None)}


def chat_body(model: str, prompt: str, max_tokens: int, bias: dict[str, float],
              stream: bool = False) -> dict[str, Any]:
    """One chat request, greedy, exactly ``max_tokens`` long (see :func:`eos_logit_bias`)."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": 0, "logit_bias": bias}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body
