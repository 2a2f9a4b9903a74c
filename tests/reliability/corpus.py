"""Malformed and hostile requests for /v1/completions, /v1/chat/completions and /v1/messages.

Each case is sent as raw bytes and must get the expected 4xx with a message that names the
problem (``needle``, matched case-insensitively against the response body). ``MODEL`` in a body
is replaced by the served model's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MODEL = "\x00MODEL\x00"
USER = [{"role": "user", "content": "hi"}]
TEN_MB = "a " * (5 * 2**20)
TOOL_OK = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@dataclass(frozen=True)
class Case:
    id: str
    path: str  # under /v1
    body: Any  # a dict (JSON-encoded) or raw bytes
    needle: str | None  # None: vLLM's message is unhelpful (see the case's comment)
    status: int = 400
    content_type: str = "application/json"

    def payload(self, model: str) -> bytes:
        raw = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        return raw.replace(json.dumps(MODEL)[1:-1].encode(), model.encode())


def _c(**kw) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **kw}


def _ch(**kw) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **kw}


def _m(**kw) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **kw}


def _raw(fields: str) -> bytes:
    model = json.dumps(MODEL)[1:-1]
    return ('{"model": "' + model + '", "prompt": "hi", "max_tokens": 2, ' + fields + "}").encode()


C, CH, M = "/completions", "/chat/completions", "/messages"
NESTED = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

CASES: list[Case] = [
    # -- /v1/completions: framing and types
    Case("c-invalid-json", C, b'{"model": ', "json"),
    Case("c-body-is-array", C, b"[1, 2]", "dictionary"),
    Case("c-text-plain", C, json.dumps(_c()).encode(), "application/json", content_type="text/plain"),
    Case("c-invalid-utf8", C, _raw('"suffix": "x"').replace(b'"hi"', b'"hi \xff\xfe"'), "parsing the body"),
    Case("c-raw-control-chars", C, _raw('"suffix": "a\x01\x02b"'), "control character"),
    Case("c-nested-100k", C, NESTED, "parsing the body"),
    Case("c-nested-500", C, b'{"model": "m", "prompt": ' + b"[" * 500 + b"]" * 500 + b"}", "prompt"),
    Case("c-prompt-object", C, _c(prompt={"a": 1}), "prompt"),
    Case("c-prompt-missing", C, {"model": MODEL, "max_tokens": 2}, "prompt"),
    Case("c-prompt-empty", C, _c(prompt=""), "prompt"),
    Case("c-token-list-empty", C, _c(prompt=[[]]), "empty"),
    Case("c-token-out-of-vocab", C, _c(prompt=[1, 999_999]), "out of vocabulary"),
    Case("c-token-negative", C, _c(prompt=[1, -3]), "greater than or equal to 0"),
    # vLLM hands a lone surrogate to the tokenizer, whose TypeError text becomes the message:
    # a 400, but it does not say what is wrong (reported upstream-side; not a plugin path).
    Case("c-lone-surrogate", C, _raw('"suffix": "x"').replace(b'"hi"', b'"hi \\ud800"'), None),
    # -- sampling parameters out of range
    Case("c-max-tokens-zero", C, _c(max_tokens=0), "max_tokens"),
    Case("c-max-tokens-negative", C, _c(max_tokens=-1), "max_tokens"),
    Case("c-max-tokens-2e70", C, _c(max_tokens=2**70), "max_tokens"),
    Case("c-max-tokens-string", C, _c(max_tokens="ten"), "max_tokens"),
    Case("c-max-tokens-float", C, _c(max_tokens=2.5), "max_tokens"),
    Case("c-temperature-huge", C, _c(temperature=1e9), "temperature"),
    Case("c-temperature-nan", C, _raw('"temperature": NaN'), "temperature"),
    Case("c-temperature-inf", C, _raw('"temperature": Infinity'), "temperature"),
    Case("c-top-p-nan", C, _raw('"top_p": NaN'), "top_p"),
    Case("c-top-p-1.5", C, _c(top_p=1.5), "top_p"),
    Case("c-top-k-negative", C, _c(top_k=-5), "top_k"),
    Case("c-n-100000", C, _c(n=100_000), "n must be at most"),
    Case("c-n-3-greedy", C, _c(n=3, temperature=0), "n must be 1"),
    Case("c-logprobs-21", C, _c(logprobs=21), "logprobs"),
    Case("c-logprobs-negative", C, _c(logprobs=-1), "logprobs"),
    Case("c-prompt-logprobs-negative", C, _c(prompt_logprobs=-2), "prompt_logprobs"),
    Case("c-min-tokens-over-max", C, _c(min_tokens=5), "min_tokens"),
    Case("c-seed-string", C, _c(seed="abc"), "seed"),
    Case("c-seed-2e80", C, _c(seed=2**80), "seed"),
    Case("c-stop-int", C, _c(stop=5), "stop"),
    Case("c-stop-100k", C, _c(stop=["x"] * 100_000), "stop"),
    Case("c-logit-bias-oov", C, _c(logit_bias={"99999999": 5}), "logit_bias"),
    Case("c-logit-bias-key", C, _c(logit_bias={"abc": 5}), "logit_bias"),
    Case("c-regex-invalid", C, _c(structured_outputs={"regex": "(["}), "regex"),
    Case("c-json-schema-invalid", C, _c(structured_outputs={"json": {"type": "nonsense"}}), "nonsense"),
    # -- lengths and the model name
    Case("c-prompt-over-max-model-len", C, _c(prompt=[1] * 1100), "maximum context length"),
    Case("c-10mb-prompt", C, _c(prompt=TEN_MB), "maximum context length"),
    Case("c-unknown-model", C, {**_c(), "model": "no-such-model"}, "no-such-model", status=404),
    # -- undeclared top-level fields: named, never silently ignored
    Case("c-unknown-field", C, _c(frobnicate={"deep": [1, 2, 3]}), "'frobnicate'"),
    Case("c-field-typo", C, _c(max_token=5), "'max_token'"),
    Case("c-best-of", C, _c(best_of=3), "'best_of'"),
    # -- /v1/chat/completions
    Case("ch-messages-missing", CH, {"model": MODEL, "max_tokens": 2}, "messages"),
    Case("ch-messages-empty", CH, _ch(messages=[]), "empty conversation"),
    Case("ch-messages-string", CH, _ch(messages="hi"), "messages"),
    Case("ch-content-int", CH, _ch(messages=[{"role": "user", "content": 5}]), "content"),
    Case("ch-content-part-unknown", CH, _ch(messages=[{"role": "user", "content": [{"type": "hologram"}]}]),
         "ChatCompletionContentPart"),
    Case("ch-image-on-text-model", CH, _ch(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]), "not a multimodal model"),
    Case("ch-tools-not-list", CH, _ch(tools={"a": 1}), "tools"),
    Case("ch-tool-name-int", CH, _ch(tools=[{"type": "function", "function": {"name": 123}}]), "function.name"),
    Case("ch-tool-parameters-string", CH,
         _ch(tools=[{"type": "function", "function": {"name": "f", "parameters": "abc"}}]), "parameters"),
    Case("ch-tool-type-unknown", CH, _ch(tools=[{"type": "laser", "function": {"name": "f"}}]), "tools.0.type"),
    Case("ch-tool-choice-missing-tool", CH,
         _ch(tools=TOOL_OK, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    Case("ch-tool-choice-without-tools", CH, _ch(tool_choice="required"), "tool_choice"),
    Case("ch-response-format-no-schema", CH, _ch(response_format={"type": "json_schema"}), "json_schema"),
    Case("ch-response-format-bad-schema", CH, _ch(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}), "nonsense"),
    Case("ch-untrusted-chat-template", CH, _ch(chat_template="{{ ''.__class__.__mro__ }}"), "chat template"),
    Case("ch-top-logprobs-without-logprobs", CH, _ch(top_logprobs=3), "top_logprobs"),
    Case("ch-prompt-over-max-model-len", CH, _ch(messages=[{"role": "user", "content": "word " * 3000}]),
         "maximum context length"),
    Case("ch-10mb-message", CH, _ch(messages=[{"role": "user", "content": TEN_MB}]), "maximum context length"),
    Case("ch-unknown-model", CH, {**_ch(), "model": "gpt-4o"}, "gpt-4o", status=404),
    Case("ch-removed-guided-json", CH, _ch(guided_json={"type": "object"}), "structured_outputs"),
    Case("ch-store-true", CH, _ch(store=True), "'store'"),
    Case("ch-prediction", CH, _ch(prediction={"type": "content", "content": "x"}), "'prediction'"),
    # -- /v1/messages (Anthropic)
    Case("m-invalid-json", M, b'{"model": "x", "messages": [', "json"),
    Case("m-max-tokens-missing", M, {"model": MODEL, "messages": USER}, "max_tokens"),
    Case("m-max-tokens-negative", M, _m(max_tokens=-5), "max_tokens"),
    Case("m-max-tokens-huge", M, _m(max_tokens=10**9), "max_model_len"),
    Case("m-messages-empty", M, _m(messages=[]), "empty conversation"),
    Case("m-content-block-unknown", M, _m(messages=[{"role": "user", "content": [{"type": "hologram"}]}]),
         "content"),
    Case("m-temperature-negative", M, _m(temperature=-1), "temperature"),
    Case("m-top-p-7", M, _m(top_p=7), "top_p"),
    Case("m-top-k-negative", M, _m(top_k=-7), "top_k"),
    Case("m-stop-sequences-int", M, _m(stop_sequences=5), "stop_sequences"),
    Case("m-tool-schema-string", M, _m(tools=[{"name": "f", "input_schema": "abc"}]), "input_schema"),
    Case("m-tool-without-name", M, _m(tools=[{"input_schema": {"type": "object"}}]), "tools.0.name"),
    Case("m-tool-choice-missing-tool", M, _m(tools=[{"name": "f", "input_schema": {"type": "object"}}],
                                            tool_choice={"type": "tool", "name": "nope"}), "nope"),
    Case("m-prompt-over-max-model-len", M, _m(messages=[{"role": "user", "content": "word " * 3000}]),
         "maximum context length"),
    Case("m-10mb-message", M, _m(messages=[{"role": "user", "content": TEN_MB}]), "maximum context length"),
    Case("m-unknown-model", M, {**_m(), "model": "claude-9"}, "claude-9", status=404),
    Case("m-unknown-field", M, _m(container="c1"), "'container'"),
]
