"""Unknown top-level request fields get an HTTP 400 that names them.

vLLM 0.32's request models accept any extra key (``extra="allow"``) and drop it with a debug
log, so ``store``, ``prediction``, ``verbosity``, the removed ``guided_json`` or a typo such as
``max_token`` got an answer that silently disregarded them. We check the top level of
``/v1/completions``, ``/v1/chat/completions`` and ``/v1/messages`` (and whatever routes reuse
their handlers, e.g. ``/invocations``). Nested objects stay lenient: agents put provider keys
such as ``cache_control`` on content blocks and tools, and those never change the output.

A few top-level keys are accepted because every value of theirs is honoured as is (``HONOURED``).
``patches.vllm.refuse_unknown_fields`` puts the check in front of the handlers.
"""

from __future__ import annotations

import functools

# key -> why any value of it is honoured here
HONOURED: dict[str, str] = {
    "cache_control": "prompt prefixes are cached automatically",
    "prompt_cache_key": "prompt prefixes are cached automatically",
    "metadata": "request tags; nothing is stored, so nothing is tagged",
    "safety_identifier": "an end-user id with no effect on the output",
}
# key -> the only values honoured (nothing is stored server-side)
HONOURED_VALUES: dict[str, tuple] = {"store": (False, None)}


@functools.cache
def _declared(model_cls) -> frozenset[str]:
    names = set()
    for name, field in model_cls.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return frozenset(names)


async def _extra_fields(request, raw_request) -> dict:
    """Top-level keys the request model did not declare. OpenAI models keep them in
    ``model_extra``; the Anthropic one drops them while parsing, so we read the body again."""
    if request.model_extra is not None:
        return request.model_extra
    if raw_request is None:
        return {}
    try:
        body = await raw_request.json()
    except ValueError:
        return {}
    declared = _declared(type(request))
    return {k: v for k, v in body.items() if k not in declared} if isinstance(body, dict) else {}


def unhonoured(extra: dict) -> list[str]:
    """The undeclared top-level fields in ``extra`` that a request may not carry, sorted."""
    return sorted(
        key for key, value in extra.items()
        if key not in HONOURED and not (key in HONOURED_VALUES and value in HONOURED_VALUES[key])
    )


def unknown_fields_message(bad: list[str]) -> str:
    """The 400 message naming the fields ``bad``."""
    names = ", ".join(repr(k) for k in bad)
    hint = ""
    if any(k.startswith("guided_") for k in bad):
        hint = " The guided_* fields were removed from vLLM: use 'structured_outputs' or 'response_format'."
    elif "store" in bad:
        hint = " Nothing is stored server-side: send 'store': false or leave it out."
    return (f"Unsupported request field(s) {names}: this server (vLLM with vllm-metal) does not "
            f"implement them and will not ignore them silently; remove them from the request.{hint}")


async def unsupported_fields(request, raw_request) -> list[str]:
    """The undeclared top-level fields of a parsed ``request`` that it may not carry, sorted."""
    return unhonoured(await _extra_fields(request, raw_request))
