"""ModelScope model ids, resolved offline through ModelScope's local cache layout.

With ``VLLM_USE_MODELSCOPE=True`` vLLM would download ``owner/name`` from modelscope.cn. We
resolve it to a local directory first — ``VLLM_METAL_MODELSCOPE_CACHE`` (a model directory or
a cache root), else ``$MODELSCOPE_CACHE``, else ``~/.cache/modelscope/hub`` — so a pre-downloaded
model serves without network, and a missing one fails with the places we looked.
``patches.vllm.resolve_model_names`` puts ``resolve`` in front of vLLM's name lookups.
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
