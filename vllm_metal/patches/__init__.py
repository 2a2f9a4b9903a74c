"""Every change vllm-metal makes to code it does not own, and where each one is installed.

One module per upstream: ``vllm`` (vLLM), ``mlx_lm`` (mlx-lm), ``torch`` (torch) and ``mlx``
(MLX's Linux wheel). Each patch is a function whose docstring says what it changes, why, and
``Delete when:`` the upstream change that makes it unnecessary; tests/test_patches.py holds one
canary per patch that fails once upstream behaves, so the patch can go. Every install is
idempotent, and every replaced function keeps the upstream one as ``__wrapped__``
(``inspect.unwrap`` reaches it).

Patches are installed in five phases, each from the one place vLLM gives us a hook:

=================  =============================================  ==================================
phase              called from                                    installs
=================  =============================================  ==================================
``at_register``    ``vllm_metal.register`` (every vLLM process,   CPU BLAS behind MLX, the ``vllm``
                   before MLX is imported)                        distribution's version
``at_activate``    ``vllm_metal.register`` once MLX imports       quiet vLLM log lines about the
                   (the platform is active in this process)       platform's own choices
``model_names``    ``MetalPlatform.pre_register_and_update``      GGUF files and ModelScope ids as
                   and the ``vllm.general_plugins`` entry point   local model directories; (entry
                                                                  point only) Qwen3.5's text classes
``in_platform``    ``MetalPlatform.check_and_update_config``      torch.accelerator no-ops; the API
                                                                  server's key and field checks,
                                                                  Anthropic client errors in one line,
                                                                  heap collected at exit, a quiet
                                                                  engine stop, the KV cache's
                                                                  device label
``at_model_load``  ``mlx_lm_models.prepare_mlx_lm``               mlx-lm's loading fixes; the KV
                                                                  cache's device label
=================  =============================================  ==================================

Three more are not installed but called: ``vllm.import_cpu_kernels`` (``MetalPlatform.import_kernels``),
``mlx_lm.config_overrides`` (the keys ``prepare_mlx_lm`` passes to mlx-lm) and
``mlx.CpuBlasThreads`` (the BLAS threads of each step on MLX's CPU backend).
"""

from __future__ import annotations

from vllm_metal.patches import mlx, mlx_lm, torch, vllm


def at_register(cpu_blas: str | None) -> None:
    """Cheap patches every vLLM process needs; ``cpu_blas`` is ``VLLM_METAL_CPU_BLAS`` (None when
    invalid: the platform refuses it at startup)."""
    vllm.answer_vllm_version()
    if cpu_blas is not None:
        mlx.load_cpu_blas(cpu_blas)


def at_activate() -> None:
    """Patches of a process where this platform is active (MLX imported), before vLLM builds
    its config."""
    vllm.quiet_platform_choices()


def model_names(use_modelscope: bool, modelscope_cache: str | None) -> None:
    """Let vLLM take a ``.gguf`` file, and with VLLM_USE_MODELSCOPE a ModelScope id, as the model."""
    vllm.resolve_model_names(use_modelscope, modelscope_cache)


def general_plugin() -> None:
    """``vllm.general_plugins`` entry point: vLLM loads it in every process before it resolves
    the model name (EngineArgs.__post_init__), which is where ModelScope ids must be mapped, and
    before it inspects the architecture, which is where model classes are registered."""
    from vllm_metal import envs

    vllm.qwen3_5_text_classes()
    try:
        cfg = envs.load()
    except envs.MetalConfigError:  # the platform refuses it with the variable named
        return
    if cfg.use_modelscope:
        model_names(cfg.use_modelscope, cfg.modelscope_cache)


def in_platform() -> None:
    """Patches of the running vLLM process, installed once its configuration is checked."""
    torch.accelerator_without_device()
    vllm.guard_all_routes()
    vllm.refuse_unknown_fields()
    vllm.answer_anthropic_client_errors()
    vllm.collect_frozen_heap_at_exit()
    vllm.engine_teardown_grace()
    vllm.quiet_deliberate_engine_stop()
    vllm.label_kv_cache_device()  # the stats line


def at_model_load() -> None:
    """Patches of the process that builds the model (vLLM's engine process), before mlx-lm builds it."""
    mlx_lm.gpt_oss_dense_experts()
    mlx_lm.yarn_truncate_flag()
    vllm.label_kv_cache_device()  # the KV cache size line
