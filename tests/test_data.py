"""The DataModule over every family: batches, resumable sampling, split names, fast failure, tweets split.

GLUE reading itself (rows, labels, errors, caching) is tested in test_glue_data.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from flexlora.data.datamodule import TaskDataModule
from flexlora.data.tweets import load_tweets
from flexlora.errors import FlexLoRAError
from tests.helpers import compose_config


def datamodule(*overrides: str) -> TaskDataModule:
    from pathlib import Path

    from flexlora.conf_store import to_plain

    plain = to_plain(compose_config("debug=tiny", *overrides, output_dir=Path("/tmp/unused")))
    return TaskDataModule(plain["task"], plain["backbone"], seed=plain["seed"])


@pytest.mark.parametrize("task, folder", [("rte", "RTE"), ("stsb", "STS-B"), ("cola", "CoLA")])
def test_tokenised_batches(real_glue_dir, task, folder):
    dm = datamodule(f"task={task}", f"task.data_dir={real_glue_dir / folder}", "task.max_length=40",
                    "task.batch_size=8", "task.eval_batch_size=16", "task.max_train_samples=64",
                    "task.max_eval_samples=32")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 40
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].dtype == (torch.float32 if task == "stsb" else torch.int64)
    (val,) = dm.val_dataloader()
    first = next(iter(val))
    assert first["input_ids"].shape[0] == 16 and first["idx"].tolist() == list(range(16))


def test_sampler_resumes_mid_epoch(glue_dir):
    overrides = ("task=rte", f"task.data_dir={glue_dir / 'RTE'}", "task.batch_size=4", "task.max_train_samples=40")
    dm = datamodule(*overrides)
    dm.setup("fit")
    full = [b["input_ids"] for b in dm.train_dataloader()]
    dm.load_state_dict({"epoch": 0, "batches_done": 3})
    resumed = [b["input_ids"] for b in dm.train_dataloader()]
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed, strict=True))
    # the next epoch is a new permutation, not skipped
    dm2 = datamodule(*overrides)
    dm2.setup("fit")
    loader = dm2.train_dataloader()
    loader.sampler.set_epoch(1)
    assert len(list(loader)) == 10


@pytest.mark.parametrize("overrides, splits", [
    (("task=mnli",), ["val_m", "val_mm"]),
    (("task=rte",), ["val"]),
    (("task=rte", "task.split=tune"), ["tune"]),
    (("task=commonsense", "backbone=tiny_llama", "task.eval_sets=[boolq,piqa]"), ["boolq", "piqa"]),
    (("task=vtab", "backbone=tiny_vit"), ["test"]),
    (("task=vtab", "backbone=tiny_vit", "task.split=tune"), ["tune"]),
    (("+experiment=rank_recovery",), ["val"]),
])
def test_evaluation_split_names(overrides, splits):
    assert datamodule(*overrides).eval_split_names == splits


def test_task_and_backbone_of_different_families_are_refused():
    with pytest.raises(FlexLoRAError, match="choose one of: backbone=tiny_llama"):
        datamodule("task=commonsense")


def test_hub_unreachable_without_data_dir_fails_fast():
    dm = datamodule("task=rte", "task.data_dir=null")
    started = time.time()
    with pytest.raises(FlexLoRAError, match=r"task\.data_dir"):
        dm.setup("fit")
    assert time.time() - started < 20


def test_tweets_split_is_fixed_balanced_and_disjoint():
    first, second = load_tweets(), load_tweets()
    assert first == second
    train, val = first["train"], first["val"]
    assert not set(train["text_a"]) & set(val["text_a"])
    for split in (train, val):
        assert set(split["label"]) == {0, 1}
        assert abs(split["label"].count(0) - split["label"].count(1)) <= 1
    assert len(train["label"]) + len(val["label"]) == 2 * 6811
