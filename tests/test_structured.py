"""Structured outputs on a live `vllm serve` of the plugin: vLLM's grammar engine (xgrammar) computes
a token bitmask each step and the plugin's runner applies it to the batch's logits. Covers
`response_format` (json_schema, json_object), the `structured_outputs` extra parameter (choice,
regex, grammar) on both endpoints, forced tool calls through the openai and anthropic SDKs
(streaming too), and a mixed batch where unconstrained neighbours must be left untouched.

The model is a 135M one on a slow CPU, so every output is checked against its constraint, never
for being sensible, and the prompts are few-shot with compact JSON to keep generations short.

The main server runs at vLLM's own ``--tool-strict-level auto`` (the plugin defaults to
``parameter``), where only the call envelope (tag and tool name) is constrained for a non-strict
tool, so the tools here are declared ``strict``; tests/test_integration.py covers non-strict tools
at the plugin's default.
"""

from __future__ import annotations

import ast
import json
import re
from concurrent.futures import ThreadPoolExecutor

import anthropic
import jsonschema
import openai
import pytest
from conftest import completion_tokens
from references import prompt_ids


def _parallel(fn, items, workers: int | None = None):
    items = list(items)
    with ThreadPoolExecutor(workers or len(items)) as pool:
        return list(pool.map(fn, items))


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or list(props),
            "additionalProperties": False}


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


# (what to describe, a compact example answer for the few-shot turn, the schema)
SCHEMAS = [
    ("a user account", '{"name":"Bo","age":7,"role":"guest"}',
     _obj({"name": {"type": "string", "minLength": 1, "maxLength": 6},
           "age": _int(0, 120),
           "role": {"enum": ["admin", "user", "guest"]}})),
    ("a box", '{"box":{"w":2.5,"h":3},"tags":["red"]}',
     _obj({"box": _obj({"w": {"type": "number", "minimum": 0, "maximum": 10}, "h": _int(1, 9)}),
           "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                    "maxItems": 2}})),
    ("a path", '{"pts":[[1,-2]],"ok":true}',
     _obj({"pts": {"type": "array", "minItems": 1, "maxItems": 2,
                   "items": {"type": "array", "items": _int(-9, 9),
                             "minItems": 2, "maxItems": 2}},
           "ok": {"type": "boolean"}})),
]
for _, _example, _schema in SCHEMAS:
    jsonschema.validate(json.loads(_example), _schema)  # the few-shot examples are valid


def _json_messages(what: str, example: str) -> list[dict]:
    return [{"role": "system", "content": "You answer with one line of compact JSON."},
            {"role": "user", "content": f"Give me {what} as JSON."},
            {"role": "assistant", "content": example},
            {"role": "user", "content": f"Another {what.split(' ', 1)[1]}, please."}]


def _json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                   "strict": True}}


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=300)


def _schema_chat(oai, server, k: int, seed: int, max_tokens: int = 60):
    """One json_schema-constrained chat request on SCHEMAS[k]; returns (schema, choice, usage)."""
    what, example, schema = SCHEMAS[k]
    r = oai.chat.completions.create(model=server.model, messages=_json_messages(what, example),
                                    response_format=_json_schema_format(schema),
                                    max_tokens=max_tokens, temperature=0.7, seed=seed)
    return schema, r.choices[0], r.usage


def _schema_violation(schema: dict, choice, usage, max_tokens: int = 60) -> str | None:
    text = choice.message.content
    if choice.finish_reason != "stop":
        return f"finish_reason={choice.finish_reason} ({usage.completion_tokens} tokens): {text!r}"
    if usage.completion_tokens > max_tokens:
        return f"{usage.completion_tokens} tokens > max_tokens: {text!r}"
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}: {text!r}"
    return None


# --------------------------------------------------------------------------------------------
# response_format


def test_json_schema_50_concurrent(oai, server):
    """50 sampled (temperature 0.7, distinct seeds) schema-constrained chats, 16 at a time: every
    one finishes and validates (nested objects, enums, bounded arrays and numbers, required
    fields, no additional properties, bounded strings)."""
    results = _parallel(lambda i: (i, *_schema_chat(oai, server, i % len(SCHEMAS), seed=i)),
                        range(50), workers=16)
    bad = [(i, why) for i, schema, c, u in results if (why := _schema_violation(schema, c, u))]
    assert not bad, f"{len(bad)}/50 invalid:\n" + "\n".join(f"  #{i}: {w}" for i, w in bad)
    texts = [c.message.content for _, _, c, _ in results]
    # the seeds sample different values: the mask leaves a real choice, not one forced string
    assert len(set(texts)) >= 10, texts
    # every schema's enum / boolean took more than one value somewhere
    parsed = [(i % len(SCHEMAS), json.loads(t)) for i, t in enumerate(texts)]
    assert len({o["role"] for k, o in parsed if k == 0}) >= 2, texts
    assert len({o["ok"] for k, o in parsed if k == 2}) == 2, texts


def test_json_object(oai, server):
    what = [{"role": "system", "content": "You answer with one line of compact JSON."},
            {"role": "user", "content": "Describe a dog as a JSON object."},
            {"role": "assistant", "content": '{"name":"Rex","legs":4}'},
            {"role": "user", "content": "Now a cat."}]

    def chat(seed):
        return oai.chat.completions.create(model=server.model, messages=what, max_tokens=40,
                                           temperature=0.7, seed=seed,
                                           response_format={"type": "json_object"}).choices[0]

    for c in _parallel(chat, [1, 2]):
        assert c.finish_reason == "stop", c.message.content
        obj = json.loads(c.message.content)
        assert isinstance(obj, dict) and obj, c.message.content


# --------------------------------------------------------------------------------------------
# structured_outputs extra parameter (vLLM's StructuredOutputsParams) on both endpoints

NUM = r"[1-9][0-9]?"
OP = r"[-+*]"
TERM = rf"(?:{NUM}|\({NUM}{OP}{NUM}\))"
ARITH_RE = re.compile(rf"{TERM}(?:{OP}{TERM}){{0,2}}")
ARITH_GRAMMAR = r"""
root ::= term (op term){0,2}
term ::= num | "(" num op num ")"
num ::= [1-9] [0-9]?
op ::= "+" | "-" | "*"
"""


def _structured(server, endpoint: str, constraint: dict, seed: int, max_tokens: int) -> dict:
    """One request with ``structured_outputs=constraint``; returns its choice (text in "text")."""
    if endpoint == "completions":
        body = {"prompt": "Q: Answer with the requested format.\nA:"}
    else:
        body = {"messages": [{"role": "user", "content": "Answer with the requested format."}]}
    path = "/completions" if endpoint == "completions" else "/chat/completions"
    r = server.post(path,
                    {"model": server.model, **body, "structured_outputs": constraint,
                     "max_tokens": max_tokens, "temperature": 0.7, "seed": seed})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    choice["text"] = choice["text"] if "text" in choice else choice["message"]["content"]
    return choice


def _run_structured(server, constraint: dict, max_tokens: int, seeds=(1, 2)):
    jobs = [(ep, s) for ep in ("completions", "chat") for s in seeds]
    choices = _parallel(lambda j: _structured(server, j[0], constraint, j[1], max_tokens), jobs)
    for (ep, seed), c in zip(jobs, choices, strict=True):
        assert c["finish_reason"] == "stop", (ep, seed, c)
    return [(ep, c["text"]) for (ep, _), c in zip(jobs, choices, strict=True)]


def test_structured_choice(server):
    choices = ["yes", "no", "maybe"]
    for ep, text in _run_structured(server, {"choice": choices}, max_tokens=8):
        assert text in choices, (ep, text)


def test_structured_regex(server):
    outs = _run_structured(server, {"regex": r"\d{3}-\d{4}"}, max_tokens=16)
    for ep, text in outs:
        assert re.fullmatch(r"\d{3}-\d{4}", text), (ep, text)
    assert len({t for _, t in outs}) > 1, outs  # sampled, not one forced string


def test_structured_grammar_alternatives(server):
    grammar = 'root ::= "yes" | "no" | "maybe"'
    for ep, text in _run_structured(server, {"grammar": grammar}, max_tokens=8):
        assert text in ("yes", "no", "maybe"), (ep, text)


def test_structured_grammar_arithmetic(server):
    # the language is finite (at most 23 characters), so 30 tokens always suffice
    for ep, text in _run_structured(server, {"grammar": ARITH_GRAMMAR}, max_tokens=30):
        assert ARITH_RE.fullmatch(text), (ep, text)
        tree = ast.parse(text, mode="eval")  # and Python agrees it is an arithmetic expression
        assert all(isinstance(n, (ast.Expression, ast.BinOp, ast.Constant, ast.operator))
                   for n in ast.walk(tree)), (ep, text)


# --------------------------------------------------------------------------------------------
# tool calling (hermes parser); SmolLM2's chat template does not render tools, so the system
# prompt shows the call format

WEATHER_PARAMS = _obj({"city": {"type": "string", "minLength": 1, "maxLength": 12},
                       "unit": {"enum": ["c", "f"]}})
ADD_PARAMS = _obj({"a": _int(0, 99), "b": _int(0, 99)})
TOOL_SCHEMAS = {"get_weather": WEATHER_PARAMS, "add": ADD_PARAMS}
OAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "strict": True,
                                      "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "add", "strict": True,
                                      "description": "Add two integers",
                                      "parameters": ADD_PARAMS}},
]
TOOL_SYSTEM = ("You can call the tools add(a, b) and get_weather(city, unit). "
               "Call a tool like this:\n<tool_call>\n"
               '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
TOOL_MSGS = [{"role": "system", "content": TOOL_SYSTEM},
             {"role": "user", "content": "What is the weather in Paris?"}]
TOOL_MAX_TOKENS = 60  # the hermes envelope alone is about 20 tokens


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def _check_call(name: str, arguments: str | dict, expected_name: str | None = None) -> dict:
    assert name in TOOL_SCHEMAS, name
    if expected_name:
        assert name == expected_name
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, TOOL_SCHEMAS[name])
    return args


def _tool_chat(oai, server, tool_choice, seed: int, **kw):
    return oai.chat.completions.create(model=server.model, messages=TOOL_MSGS, tools=OAI_TOOLS,
                                       tool_choice=tool_choice, parallel_tool_calls=False,
                                       max_tokens=TOOL_MAX_TOKENS, temperature=0.7, seed=seed,
                                       **kw)


@pytest.mark.parametrize("tool_choice", ["required", "get_weather", "add"])
def test_forced_tool_call(oai, server, tool_choice):
    forced = tool_choice != "required"
    r = _tool_chat(oai, server, _named(tool_choice) if forced else "required", seed=3)
    c = r.choices[0]
    assert c.finish_reason != "length", c.message
    if not forced:
        assert c.finish_reason == "tool_calls"
    assert c.message.tool_calls and len(c.message.tool_calls) == 1, c.message
    assert not c.message.content
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id
    _check_call(call.function.name, call.function.arguments, tool_choice if forced else None)


def test_tool_choice_auto(oai, server):
    r = oai.chat.completions.create(model=server.model, messages=TOOL_MSGS, tools=OAI_TOOLS,
                                    tool_choice="auto", max_tokens=16, temperature=0)
    m = r.choices[0].message
    assert m.content or m.tool_calls, m
    for call in m.tool_calls or []:
        _check_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("tool_choice", ["required", "add"])
def test_forced_tool_call_streaming(oai, server, tool_choice):
    forced = tool_choice != "required"
    stream = _tool_chat(oai, server, _named(tool_choice) if forced else "required", seed=5,
                        stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "args": []})
                call["id"] = call["id"] or d.id
                if d.function and d.function.name:
                    call["name"] += d.function.name
                if d.function and d.function.arguments:
                    call["args"].append(d.function.arguments)
    assert finish is not None and finish != "length", (finish, calls)
    assert list(calls) == [0], calls
    call = calls[0]
    assert call["id"] and len(call["args"]) > 1, call  # arguments arrive incrementally
    _check_call(call["name"], "".join(call["args"]), tool_choice if forced else None)


# --------------------------------------------------------------------------------------------
# anthropic SDK /v1/messages (this SDK version has no `temperature` argument: extra_body; the
# Messages API has no `seed`, and an undeclared field gets a 400, so these samples are unseeded)

ANTHROPIC_TOOLS = [{"name": n, "description": f"the {n} tool", "input_schema": s, "strict": True}
                   for n, s in TOOL_SCHEMAS.items()]


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base, api_key="x", max_retries=0, timeout=300)


def _claude_tool(claude, server, tool_choice: dict, user: str):
    return claude.messages.create(model=server.model, max_tokens=TOOL_MAX_TOKENS,
                                  system=TOOL_SYSTEM, tools=ANTHROPIC_TOOLS,
                                  tool_choice=tool_choice,
                                  messages=[{"role": "user", "content": user}],
                                  extra_body={"temperature": 0.7})


def _tool_use_block(m, expected_name: str | None = None):
    assert m.stop_reason == "tool_use", m
    blocks = [b for b in m.content if b.type == "tool_use"]
    assert len(blocks) == 1, m.content
    b = blocks[0]
    assert b.id
    _check_call(b.name, b.input, expected_name)
    return b


def test_anthropic_forced_tool(claude, server):
    m = _claude_tool(claude, server, {"type": "tool", "name": "get_weather"},
                     "What is the weather in Paris?")
    _tool_use_block(m, "get_weather")


def test_anthropic_any_tool_round_trip(claude, server):
    user = "What is 2 plus 3?"
    m = _claude_tool(claude, server, {"type": "any"}, user)
    b = _tool_use_block(m)
    result = (str(b.input["a"] + b.input["b"]) if b.name == "add"
              else f"18 degrees {b.input['unit'].upper()}, sunny")
    reply = claude.messages.create(
        model=server.model, max_tokens=16, system=TOOL_SYSTEM, tools=ANTHROPIC_TOOLS,
        messages=[{"role": "user", "content": user},
                  {"role": "assistant", "content": [
                      {"type": "tool_use", "id": b.id, "name": b.name, "input": b.input}]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": b.id, "content": result}]}],
        extra_body={"temperature": 0})
    assert reply.role == "assistant" and reply.stop_reason in ("end_turn", "max_tokens"), reply
    texts = [blk.text for blk in reply.content if blk.type == "text"]
    assert texts and "".join(texts).strip(), reply.content


def test_anthropic_forced_tool_streaming(claude, server):
    partial, starts = [], []
    with claude.messages.stream(model=server.model, max_tokens=TOOL_MAX_TOKENS,
                                system=TOOL_SYSTEM, tools=ANTHROPIC_TOOLS,
                                tool_choice={"type": "tool", "name": "add"},
                                messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                                extra_body={"temperature": 0.7}) as s:
        for ev in s:
            if ev.type == "content_block_start" and ev.content_block.type == "tool_use":
                starts.append(ev.content_block)
            elif ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                partial.append(ev.delta.partial_json)
        final = s.get_final_message()
    assert len(starts) == 1 and starts[0].name == "add", starts
    assert len(partial) > 1, partial  # incremental
    args = _check_call("add", "".join(partial), "add")
    b = _tool_use_block(final, "add")
    assert b.id == starts[0].id and b.input == args


# --------------------------------------------------------------------------------------------
# mixed batch: the mask must touch only the constrained rows


def test_free_rows_unchanged_in_mixed_batch(oai, server, models):
    ids = prompt_ids(models.hf)
    free_prompts = [ids[0], ids[2], ids[4]]
    n = 12
    solo = [completion_tokens(server, p, n) for p in free_prompts]

    def job(j):
        kind, x = j
        if kind == "free":
            return completion_tokens(server, x, n)
        return _schema_chat(oai, server, x, seed=100 + x)

    jobs = [("json", k) for k in range(3)] + [("free", p) for p in free_prompts]
    out = _parallel(job, jobs)
    for k, (schema, c, u) in enumerate(out[:3]):
        why = _schema_violation(schema, c, u)
        assert why is None, (k, why)
    for i, (alone, mixed) in enumerate(zip(solo, out[3:], strict=True)):
        assert mixed == alone, (i, alone, mixed)
