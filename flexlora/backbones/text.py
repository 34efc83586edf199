"""Text encoders with a sequence-classification head, and tokenizers (shared by the data and the model)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from flexlora.backbones.hub import resolve_pretrained
from flexlora.errors import FlexLoRAError
from flexlora.schemas import BackboneConfig, backbone_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tokenizer_source(backbone: Mapping[str, Any] | BackboneConfig) -> str:
    backbone = backbone_config(backbone)
    source = backbone.tokenizer or backbone.pretrained
    if not source:
        raise FlexLoRAError("backbone.tokenizer is required when backbone.pretrained is null")
    return str(source)


@functools.lru_cache(maxsize=8)
def _tokenizer(source: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_pretrained(source))


def load_tokenizer(backbone: Mapping[str, Any] | BackboneConfig) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer; loaded once per process (the DataModule and the module both need it)."""
    return _tokenizer(tokenizer_source(backbone))


def build_classifier(backbone: Mapping[str, Any] | BackboneConfig, num_labels: int) -> torch.nn.Module:
    """An ``AutoModelForSequenceClassification`` (random head), from pretrained weights or from a config."""
    backbone = backbone_config(backbone)
    overrides = dict(backbone.config or {})
    problem = "regression" if num_labels == 1 else "single_label_classification"
    if backbone.pretrained:
        path = resolve_pretrained(backbone.pretrained)
        config = AutoConfig.from_pretrained(path, num_labels=num_labels, problem_type=problem, **overrides)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    else:
        spec = dict(backbone.from_config or {})
        if "model_type" not in spec:
            raise FlexLoRAError("backbone.from_config needs a model_type when backbone.pretrained is null")
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(model_type, num_labels=num_labels, problem_type=problem, **{**spec, **overrides})
        model = AutoModelForSequenceClassification.from_config(config)
    dtype = backbone.dtype
    if dtype:
        model = model.to(DTYPES[dtype])
    # transformers 5 returns models in eval mode; training code must not inherit that silently.
    return model.train()
