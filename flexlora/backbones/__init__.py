"""Backbone loaders per model family (text classifiers, causal LMs, vision transformers, synthetic nets)."""
