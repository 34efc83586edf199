"""Deprecated location: use flexlora.backbones (kept until every caller has moved)."""

from flexlora.backbones.hub import resolve_pretrained
from flexlora.backbones.text import build_classifier, load_tokenizer

__all__ = ["build_classifier", "load_tokenizer", "resolve_pretrained"]
