"""Every allocator default is written once, in its schema: the composed preset and the schema built with only
the budget's fields agree on every field (the YAML files set only what the budget presets decide)."""

from __future__ import annotations

import dataclasses

import pytest

from flexlora.allocators.config import allocator_config, load_methods
from flexlora.conf_store import compose, to_plain

BUDGET_FIELDS = ("rank", "target_rank", "alpha")


@pytest.mark.parametrize("name", sorted(load_methods()))
def test_composed_allocator_equals_its_schema_defaults(tmp_path, name):
    composed = to_plain(compose(f"allocator={name}", output_dir=tmp_path))["allocator"]
    from_schema = allocator_config({"name": name, **{k: composed[k] for k in BUDGET_FIELDS if k in composed}})
    assert dataclasses.asdict(allocator_config(composed)) == dataclasses.asdict(from_schema)


@pytest.mark.parametrize("name", sorted(load_methods()))
def test_default_budget_equals_the_schema_with_no_arguments(tmp_path, name):
    composed = to_plain(compose(f"allocator={name}", output_dir=tmp_path))["allocator"]
    assert dataclasses.asdict(allocator_config(composed)) == dataclasses.asdict(allocator_config({"name": name}))
