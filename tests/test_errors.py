"""Bad input: one clear error each, no traceback, no run folder that looks finished."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from flexlora.errors import FlexLoRAError
from flexlora.train import build, train
from flexlora.training import RankAllocationCallback
from tests.conftest import shared_data
from tests.helpers import tiny_run_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def cli(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", *overrides],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def assert_clean_failure(proc: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in output, output[-2000:]
    for needle in needles:
        assert needle in output, output[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_cli_target_modules_matching_nothing(tmp_path, glue_dir):
    proc = cli(tmp_path, "backbone=tiny_deberta", "task=rte", f"task.data_dir={glue_dir / 'RTE'}",
               "backbone.target_modules=[qury_proj]")
    assert_clean_failure(proc, tmp_path, "match no linear layer", "query_proj", "backbone.target_modules")
    assert (tmp_path / "run" / "error.txt").is_file()


def test_cli_unknown_option(tmp_path):
    proc = cli(tmp_path, "task=glue_rte")
    assert_clean_failure(proc, tmp_path, "Could not find 'task/glue_rte'", "rte")
    proc = cli(tmp_path, "allocator=sora")
    assert_clean_failure(proc, tmp_path, "Could not find 'allocator/sora'", "flexlora")


@pytest.mark.slow
def test_cli_schedule_without_event_window(tmp_path, glue_dir):
    proc = cli(tmp_path, "backbone=tiny_deberta", "task=rte", f"task.data_dir={glue_dir / 'RTE'}",
               "task.max_train_samples=64", "trainer.max_steps=10", "allocator.t_init=6", "allocator.t_final=4",
               "allocator.delta_t=1", "trainer.enable_progress_bar=false")
    assert_clean_failure(proc, tmp_path, "no allocation event fits", "T=10 optimizer steps", "allocator.t_init")


@pytest.fixture
def cfg(tmp_path, glue_dir):
    return lambda *o: tiny_run_config(tmp_path / "run", glue_dir, *o)


def test_max_rank_below_rank(cfg):
    with pytest.raises(FlexLoRAError, match=r"max_rank \(4\) < allocator.rank \(8\)"):
        build(cfg("allocator.max_rank=4"))


def test_budget_per_event_too_large(cfg):
    with pytest.raises(FlexLoRAError, match="budget_per_event=7 is too large for 12 adapted matrices"):
        train(cfg("allocator.budget_per_event=7"))


def test_adalora_schedule_too_long(cfg):
    with pytest.raises(FlexLoRAError, match="t_init must be < T - t_final"):
        train(cfg("allocator=adalora", "allocator.t_init=15", "allocator.t_final=10"))


def test_hub_unreachable_without_data_dir(cfg):
    with pytest.raises(FlexLoRAError, match=r"Pass task.data_dir="):
        train(cfg("task.data_dir=null"))


def test_hub_backbone_unreachable(cfg):
    with pytest.raises(FlexLoRAError, match="not in the local Hugging Face cache and the Hub is unreachable"):
        build(cfg("backbone=deberta_v3_base"))


def test_malformed_tsv_through_a_run(cfg, tmp_path, glue_dir):
    bad = tmp_path / "RTE"
    bad.mkdir()
    lines = (glue_dir / "RTE" / "train.tsv").read_text().splitlines(keepends=True)
    lines[5] = "5\tbroken row\n"
    (bad / "train.tsv").write_text("".join(lines))
    (bad / "dev.tsv").write_text((glue_dir / "RTE" / "dev.tsv").read_text())
    with pytest.raises(FlexLoRAError, match=r"RTE/train.tsv:6: expected 4 tab-separated fields"):
        train(cfg(f"task.data_dir={bad}"))


class PoisonAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.classifier.weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cfg, tmp_path):
    datamodule, module, trainer, _ = build(cfg("callbacks=default", "trainer.enable_progress_bar=false",
                                               "callbacks.model_checkpoint.every_n_train_steps=2"))
    trainer.callbacks.append(PoisonAt(5))
    with pytest.raises(FlexLoRAError, match="training loss is nan at optimizer step 6"):
        trainer.fit(module, datamodule=datamodule)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_sharded_strategies_are_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(FlexLoRAError, match="shards parameters"):
        RankAllocationCallback().setup(FakeTrainer(), object(), "fit")


# ---------------------------------------------------------------- bad data in every family's shape
def one_line_error(overrides: list[str], output_dir: Path) -> str:
    from tests.helpers import compose_config

    with pytest.raises(FlexLoRAError) as info:
        train(compose_config("debug=tiny", *overrides, output_dir=output_dir))
    message = str(info.value)
    assert "\n" not in message and not (output_dir / "metrics.json").exists()
    return message


def rte_folder(tmp_path: Path, train: bytes, dev: bytes | None = None) -> Path:
    folder = tmp_path / "RTE"
    folder.mkdir()
    header = b"index\tsentence1\tsentence2\tlabel\n"
    (folder / "train.tsv").write_bytes(header + train)
    (folder / "dev.tsv").write_bytes(header + (dev if dev is not None else b"0\ta\tb\tentailment\n"))
    return folder


@pytest.mark.parametrize("train_rows, dev_rows, needle", [
    (b"0\ta\tb\tentailment\n1\tc\td\tmaybe\n", None, "train.tsv:3: label 'maybe' is not one of"),
    (b"0\ta\tb\tentailment\n", b"", "dev.tsv"),
    (b"0\ta\tb\tentailment\n1\t\xff\xfe bad\tx\tentailment\n", None, "UTF-8"),
])
def test_bad_glue_files(tmp_path, train_rows, dev_rows, needle):
    folder = rte_folder(tmp_path, train_rows, dev_rows)
    message = one_line_error(["task=rte", f"task.data_dir={folder}"], tmp_path / "run")
    assert needle in message and "RTE" in message


def commonsense_folder(tmp_path: Path, record: dict) -> Path:
    import json

    good = {"instruction": "Q? Answer format: true/false", "input": "", "output": "the correct answer is true",
            "answer": "true"}
    folder = tmp_path / "cs" / "boolq"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps([good, record]))
    (folder / "test.json").write_text(json.dumps([good, good]))
    return folder.parent


@pytest.mark.parametrize("record, needle", [
    ({"input": "", "answer": "true"}, "record 1"),
    ({"instruction": "Q?", "input": "", "answer": "maybe"}, "'maybe'"),
])
def test_bad_commonsense_records(tmp_path, record, needle):
    root = commonsense_folder(tmp_path, record)
    message = one_line_error(["backbone=tiny_llama", "task=commonsense", f"task.data_dir={root}",
                              "task.eval_sets=[boolq]"], tmp_path / "run")
    assert needle in message and "boolq/train.json" in message


def vtab_folder(tmp_path: Path, train_lines: str, image: bytes | None = None) -> Path:
    import shutil

    source = shared_data("vtab-1k", "fashion_mnist")
    folder = tmp_path / "fashion_mnist"
    (folder / "images").mkdir(parents=True)
    names = [line.split()[0] for line in (source / "test.txt").read_text().splitlines()[:4]]
    for name in names:
        shutil.copy(source / name, folder / name)
    if image is not None:
        (folder / names[0]).write_bytes(image)
    rows = "".join(f"{n} {i % 2}\n" for i, n in enumerate(names))
    for list_name in ("train800.txt", "val200.txt", "test.txt"):
        (folder / list_name).write_text(rows)
    (folder / "train800val200.txt").write_text(rows + train_lines)
    return folder


@pytest.mark.parametrize("extra, image, overrides, needle", [
    ("images/test_x.png\n", None, [], "train800val200.txt:5"),
    ("", b"not a png", [], "cannot decode image"),
    ("", None, ["task.num_classes=1"], "out of range for 1 classes"),
])
def test_bad_vtab_folders(tmp_path, extra, image, overrides, needle):
    if shared_data("vtab-1k", "fashion_mnist") is None:
        pytest.skip("shared/data/vtab-1k/fashion_mnist not found")
    folder = vtab_folder(tmp_path, extra, image)
    message = one_line_error(["backbone=tiny_vit", "task=vtab", f"task.data_dir={folder}", "trainer.max_steps=8",
                              "task.batch_size=2", *overrides], tmp_path / "run")
    assert needle in message


@pytest.mark.slow
def test_bad_data_through_run_py_exits_2_without_traceback(tmp_path):
    root = commonsense_folder(tmp_path, {"input": "", "answer": "true"})
    proc = cli(tmp_path, "debug=tiny", "backbone=tiny_llama", "task=commonsense", f"task.data_dir={root}",
               "task.eval_sets=[boolq]")
    assert proc.returncode == 2
    assert_clean_failure(proc, tmp_path, "boolq/train.json: record 1")
