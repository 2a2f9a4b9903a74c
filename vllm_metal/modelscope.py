"""ModelScope model ids, resolved offline through ModelScope's local cache layout.

With ``VLLM_USE_MODELSCOPE=True`` vLLM would download ``owner/name`` from modelscope.cn. We
resolve it to a local directory first — ``VLLM_METAL_MODELSCOPE_CACHE`` (a model directory or
a cache root), else ``$MODELSCOPE_CACHE``, else ``~/.cache/modelscope/hub`` — so a pre-downloaded
model serves without network, and a missing one fails with the places we looked.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelScopeNotFound(FileNotFoundError):
    pass


def cache_roots(explicit: str | None) -> list[Path]:
    roots = []
    if explicit:
        roots.append(Path(explicit).expanduser())
    if os.environ.get("MODELSCOPE_CACHE"):
        roots.append(Path(os.environ["MODELSCOPE_CACHE"]).expanduser())
    roots.append(Path("~/.cache/modelscope/hub").expanduser())
    return roots


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def candidates(model_id: str, explicit: str | None) -> list[Path]:
    """Directories ModelScope's cache may keep ``model_id`` in, most specific first.

    ModelScope stores ``owner/name`` under ``<root>/models/owner/name`` (recent releases) or
    ``<root>/owner/name`` (older ones), with dots in names written as ``___``.
    """
    out: list[Path] = []
    if explicit and _is_model_dir(Path(explicit).expanduser()):
        out.append(Path(explicit).expanduser())
    names = [model_id]
    if "." in model_id:
        names.append(model_id.replace(".", "___"))
    for root in cache_roots(explicit):
        for name in names:
            out += [root / "models" / name, root / "hub" / "models" / name, root / name, root / "hub" / name]
    return out


def resolve(model_id: str, explicit: str | None) -> str:
    """Local directory of ``model_id``; raises ModelScopeNotFound naming every place looked in."""
    if Path(model_id).expanduser().exists():
        return model_id
    looked = candidates(model_id, explicit)
    for path in looked:
        if _is_model_dir(path):
            return str(path)
    where = "\n  ".join(str(p) for p in looked)
    raise ModelScopeNotFound(
        f"VLLM_USE_MODELSCOPE: model {model_id!r} is not in the local ModelScope cache "
        f"(vllm-metal resolves ModelScope ids offline). Looked in:\n  {where}\n"
        f"Download it first (`modelscope download --model {model_id}`), or point "
        "VLLM_METAL_MODELSCOPE_CACHE at the model directory or the cache root."
    )


def install_resolver(explicit: str | None) -> None:
    """Make vLLM see the local directory instead of the ModelScope id, before it looks it up.

    With HF_HUB_OFFLINE vLLM's EngineArgs maps the name through ``get_model_path``; it then
    probes the model for a speculator config
    (``maybe_override_with_speculators``, whose returned model/tokenizer replace its own) and
    ModelConfig then passes names through ``maybe_model_redirect``; we resolve the id in both,
    so nothing reaches ModelScope's network client.
    Delete when: vLLM offers a hook to map model names before loading (or resolves ModelScope
    ids from its local cache when offline).
    """
    import vllm.config.model as model_config_module
    import vllm.engine.arg_utils as arg_utils

    redirect = model_config_module.maybe_model_redirect
    if getattr(redirect, "__vllm_metal_modelscope__", False):
        return

    def resolve_name(name):
        return name if name is None else resolve(name, explicit)

    def model_redirect(model: str) -> str:
        return resolve_name(redirect(model))

    model_path = arg_utils.get_model_path

    def get_model_path(model, revision=None):
        resolved = resolve_name(model)
        return resolved if resolved != model else model_path(model, revision)

    speculators = arg_utils.maybe_override_with_speculators

    def override_with_speculators(*args, **kwargs):
        kwargs["model"] = resolve_name(kwargs.get("model"))
        if kwargs.get("tokenizer"):
            kwargs["tokenizer"] = resolve_name(kwargs["tokenizer"])
        return speculators(*args, **kwargs)

    model_redirect.__vllm_metal_modelscope__ = True
    model_config_module.maybe_model_redirect = model_redirect
    arg_utils.maybe_override_with_speculators = override_with_speculators
    arg_utils.get_model_path = get_model_path


def register_general_plugin() -> None:
    """``vllm.general_plugins`` entry point: vLLM loads it in every process before it resolves
    the model name (EngineArgs.__post_init__), which is where ModelScope ids must be mapped."""
    from vllm_metal import envs

    cfg = envs.load()
    if cfg.use_modelscope:
        install_resolver(cfg.modelscope_cache)
