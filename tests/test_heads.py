"""Setups that must not decide a comparison: the same head for every method, a regression head that starts at the
label mean, its own learning rate, and near-constant regression outputs flagged as degenerate."""

from __future__ import annotations

import hydra
import numpy as np
import pytest
import torch

from flexlora.backbones.heads import head_module_names, init_head
from flexlora.conf_store import to_plain
from flexlora.metrics import describe_degenerate, is_degenerate
from tests.helpers import tiny_run_config


def _module(tmp_path, glue_dir, *overrides: str):
    cfg = tiny_run_config(tmp_path, glue_dir, *overrides)
    return hydra.utils.instantiate(to_plain(cfg)["model"] | {"_convert_": "all"})


def _head(module) -> dict[str, torch.Tensor]:
    heads = module.hparams["backbone"]["head_modules"]
    return {k: v.clone() for k, v in module.model.state_dict().items() if any(f".{h}." in f".{k}" for h in heads)}


def test_every_allocator_starts_from_the_same_head_whatever_the_global_rng_did(tmp_path, glue_dir):
    heads = {}
    for i, allocator in enumerate(("lora", "adalora", "flexlora")):
        torch.manual_seed(123)
        torch.rand(1000 * i + 7)  # a different amount of global randomness consumed before the model is built
        heads[allocator] = _head(_module(tmp_path / allocator, glue_dir, f"allocator={allocator}", "seed=5"))
    assert heads["lora"], "no head tensors found"
    for allocator in ("adalora", "flexlora"):
        assert heads[allocator].keys() == heads["lora"].keys()
        for key, value in heads["lora"].items():
            assert torch.equal(heads[allocator][key], value), f"{key} differs between lora and {allocator}"
    other_seed = _head(_module(tmp_path / "s6", glue_dir, "allocator=lora", "seed=6"))
    assert not all(torch.equal(other_seed[k], v) for k, v in heads["lora"].items()), "the head must follow the seed"


def test_init_head_follows_the_transformers_convention(tiny_deberta):
    touched = init_head(tiny_deberta, ["classifier", "pooler"], seed=0, std=0.02)
    assert touched == head_module_names(tiny_deberta, ["classifier", "pooler"]) == ["pooler", "classifier"]
    weight = tiny_deberta.classifier.weight
    assert torch.equal(tiny_deberta.classifier.bias, torch.zeros_like(tiny_deberta.classifier.bias))
    expected = torch.Generator().manual_seed(0 + 1_000_003)
    pooler = torch.empty(tiny_deberta.pooler.dense.weight.shape).normal_(0.0, 0.02, generator=expected)
    assert torch.equal(tiny_deberta.pooler.dense.weight, pooler)  # drawn first: module order
    assert 0.01 < float(weight.std()) < 0.03


def test_regression_head_starts_at_the_training_label_mean(tmp_path, real_glue_dir):
    module = _module(tmp_path, real_glue_dir, "task=stsb", f"task.data_dir={real_glue_dir / 'STS-B'}",
                     "allocator=lora")
    labels = module.family.raw_splits["train"]["label"]
    assert module.model.classifier.bias.item() == pytest.approx(float(np.mean(labels)), rel=1e-6)
    assert 2.0 < module.model.classifier.bias.item() < 3.5  # STS-B scores are in 0 - 5


def test_head_lr_is_its_own_param_group(tmp_path, glue_dir):
    module = _module(tmp_path, glue_dir, "allocator=flexlora", "model.head_lr=0.005")
    groups = {g["name"]: g for g in module.param_groups()}
    assert set(groups) == {"adapter_decay", "head_decay", "head_no_decay"}
    assert groups["head_decay"]["lr"] == groups["head_no_decay"]["lr"] == 0.005
    assert "lr" not in groups["adapter_decay"]  # the optimizer's lr
    adapter_ids = {id(p) for layer in module.adapters.values() for p, _ in layer.slot_params()}
    assert {id(p) for p in groups["adapter_decay"]["params"]} == adapter_ids
    default = _module(tmp_path / "b", glue_dir, "allocator=flexlora")
    assert all("lr" not in g for g in default.param_groups())


def test_near_constant_regression_is_degenerate():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 500)
    collapsed = 2.7 + rng.normal(0, 0.00025, 500)  # what the audited STS-B LoRA run predicted
    assert is_degenerate(collapsed, regression=True, labels=labels)
    assert describe_degenerate(collapsed, regression=True, labels=labels).startswith("near-constant predictions")
    assert not is_degenerate(collapsed, regression=True)  # without labels only exact constancy counts
    healthy = labels + rng.normal(0, 1.0, 500)
    assert not is_degenerate(healthy, regression=True, labels=labels)
    assert not is_degenerate(2.7 + rng.normal(0, 0.01, 500), regression=True, labels=labels)  # std ratio 7e-3
