"""scripts/aggregate.py on synthetic run folders with known numbers (no training, no W&B)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("aggregate", REPO / "scripts" / "aggregate.py")
aggregate = importlib.util.module_from_spec(_spec)
sys.modules["aggregate"] = aggregate
_spec.loader.exec_module(aggregate)

PARAMS = {"lora": 1_330_000, "adalora": 1_270_000, "flexlora": 1_900_000}


def write_run(root: Path, allocator: str, task: str, seed: int, final: dict | None, backbone: str = "deberta_v3_base",
              **config) -> Path:
    run = root / f"{allocator}-{task}-s{seed}-{backbone}"
    run.mkdir(parents=True)
    metrics = {"trainable_params": PARAMS.get(allocator, 1000), "total_rank": 96, "events": 3,
               "config": {"allocator": {"name": allocator, **config}, "task": {"name": task},
                          "backbone": {"name": backbone}, "seed": seed, "experiment_name": "test"}}
    if final is not None:
        metrics["final"] = {"val/loss": 0.5, **final}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    """flexlora: RTE 3 seeds, MNLI and QQP 2 seeds; lora: RTE seeds 1, 2 only, MNLI 2 seeds, no QQP."""
    root = tmp_path / "sweep"
    for seed, acc in zip((1, 2, 3), (0.80, 0.82, 0.87), strict=True):
        write_run(root, "flexlora", "rte", seed, {"val/accuracy": acc})
    for seed, (m, mm) in zip((1, 2), ((0.90, 0.92), (0.91, 0.93)), strict=True):
        write_run(root, "flexlora", "mnli", seed, {"val_m/accuracy": m, "val_mm/accuracy": mm})
        write_run(root, "lora", "mnli", seed, {"val_m/accuracy": m - 0.01, "val_mm/accuracy": mm - 0.01})
    for seed, (acc, f1) in zip((1, 2), ((0.90, 0.86), (0.92, 0.88)), strict=True):
        write_run(root, "flexlora", "qqp", seed, {"val/accuracy": acc, "val/f1": f1})
    for seed, acc in zip((1, 2), (0.70, 0.74), strict=True):
        write_run(root, "lora", "rte", seed, {"val/accuracy": acc})
    return root


def rows_by_name(table):
    return {row.key[0]: row for row in table.rows}


def test_cells_mean_std_n_scaled(sweep):
    (table,) = aggregate.summarise(aggregate.collect([sweep]))
    assert [c.task for c in table.columns] == ["mnli", "qqp", "rte"]  # the AdaLoRA paper's column order
    flex = rows_by_name(table)["flexlora"]
    rte = flex.cells["rte"].stats[0]
    assert rte.n == 3
    assert rte.mean == pytest.approx(83.0)
    assert rte.std == pytest.approx(13 ** 0.5)  # sample std (ddof=1) of 80, 82, 87
    assert aggregate.format_cell(flex.cells["rte"]) == "83.00 ± 3.61 (n=3)"
    assert aggregate.format_cell(flex.cells["mnli"]) == "90.50 ± 0.71 / 92.50 ± 0.71 (n=2)"
    assert aggregate.format_cell(flex.cells["qqp"]) == "91.00 ± 1.41 / 87.00 ± 1.41 (n=2)"
    assert flex.label == "FlexLoRA (1.90M)"
    assert [row.key[0] for row in table.rows] == ["lora", "flexlora"]


def test_single_seed_has_no_std(tmp_path):
    write_run(tmp_path, "adalora", "cola", 7, {"val/mcc": 0.7145})
    (table,) = aggregate.summarise(aggregate.collect([tmp_path]))
    (row,) = table.rows
    assert aggregate.format_cell(row.cells["cola"]) == "71.45 (n=1)"
    assert row.cells["cola"].stats[0].std is None
    assert aggregate.format_avg(row) == "71.45"


def test_glue_average_pre_averages_mnli_and_qqp(sweep):
    (table,) = aggregate.summarise(aggregate.collect([sweep]))
    flex = rows_by_name(table)["flexlora"]
    # MNLI (90.5 + 92.5) / 2 = 91.5, QQP (91 + 87) / 2 = 89, RTE 83 -> 87.8333 (not the 5-metric mean 88.4)
    assert flex.avg == pytest.approx((91.5 + 89.0 + 83.0) / 3)
    assert flex.complete and aggregate.format_avg(flex) == "87.83"


def test_missing_runs_are_reported_and_marked(sweep):
    (table,) = aggregate.summarise(aggregate.collect([sweep]))
    lora = rows_by_name(table)["lora"]
    assert "qqp" not in lora.cells
    assert not lora.complete
    assert lora.avg == pytest.approx((90.5 + 72.0) / 2)  # only the tasks it has: MNLI (89.5+91.5)/2, RTE 72
    assert aggregate.format_avg(lora) == "81.25*"
    assert lora.cells["rte"].seeds == [1, 2]
    notes = " ".join(table.notes)
    assert "LoRA RTE: seed 3 missing (n=2 of 3)" in notes
    assert "LoRA QQP: no runs" in notes
    assert "FlexLoRA" not in notes.split("Missing runs:")[1].split(".")[0]
    markdown = aggregate.render_markdown([table])
    assert "| LoRA (1.33M) | 89.50 ± 0.71 / 91.50 ± 0.71 (n=2) | – | 72.00 ± 2.83 (n=2) | 81.25* |" in markdown
    assert "Missing runs:" in markdown


def test_runs_without_final_are_skipped_with_a_warning(sweep, capsys):
    write_run(sweep, "flexlora", "rte", 4, None)
    runs = aggregate.collect([sweep])
    assert len(runs) == 11  # 3 + 2 + 2 + 2 + 2; the unfinished seed 4 is not among them
    assert 4 not in {r.seed for r in runs}
    assert "no 'final' metrics" in capsys.readouterr().err


def test_one_table_per_backbone_and_duplicates(tmp_path):
    write_run(tmp_path, "lora", "sst2", 1, {"val/accuracy": 0.95}, backbone="deberta_v3_base")
    write_run(tmp_path, "lora", "sst2", 1, {"val/accuracy": 0.90}, backbone="minilm")
    newer = write_run(tmp_path / "again", "lora", "sst2", 1, {"val/accuracy": 0.91}, backbone="minilm")
    os.utime(newer / "metrics.json", (2e9, 2e9))
    tables = aggregate.summarise(aggregate.collect([tmp_path]))
    assert [t.backbone for t in tables] == ["deberta_v3_base", "minilm"]
    assert tables[0].rows[0].cells["sst2"].stats[0].mean == pytest.approx(95.0)
    assert tables[1].rows[0].cells["sst2"].stats[0].mean == pytest.approx(91.0)  # the newest run wins
    assert any("duplicate" in note for note in tables[1].notes)


def test_rows_by_extra_config_key(tmp_path):
    for importance, acc in (("entropy", 0.8), ("nuclear", 0.7)):
        write_run(tmp_path / importance, "flexlora", "rte", 1, {"val/accuracy": acc}, importance=importance)
    (table,) = aggregate.summarise(aggregate.collect([tmp_path], ("allocator.name", "allocator.importance")),
                                   ("allocator.name", "allocator.importance"))
    assert [row.label for row in table.rows] == ["FlexLoRA importance=entropy (1.90M)",
                                                 "FlexLoRA importance=nuclear (1.90M)"]


def test_cli_writes_markdown_csv_png(sweep, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "scripts/aggregate.py", str(sweep), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| FlexLoRA (1.90M) | 90.50 ± 0.71 / 92.50 ± 0.71 (n=2) | 91.00 ± 1.41 / 87.00 ± 1.41 (n=2) | " \
           "83.00 ± 3.61 (n=3) | 87.83 |" in proc.stdout
    markdown = (out / "results.md").read_text()
    assert "| Method (# Params) | MNLI m/mm | QQP Acc/F1 | RTE Acc | Avg |" in markdown
    rows = list(csv.DictReader((out / "results.csv").open()))
    rte = next(r for r in rows if r["allocator.name"] == "flexlora" and r["task"] == "rte")
    assert (rte["mean"], rte["std"], rte["n"], rte["seeds"]) == ("83.0000", "3.6056", "3", "1 2 3")
    avg = next(r for r in rows if r["allocator.name"] == "lora" and r["task"] == "Avg")
    assert (avg["metric"], avg["mean"]) == ("avg_incomplete", "81.2500")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_fails_without_runs(tmp_path):
    assert aggregate.main([str(tmp_path)]) == 1


def test_avg_reproduces_the_adalora_papers_glue_average(tmp_path):
    """The AdaLoRA paper's DeBERTaV3-base numbers average to its reported 89.31 only with MNLI/QQP pre-averaged."""
    paper = {"mnli": {"val_m/accuracy": .9076, "val_mm/accuracy": .9079}, "sst2": {"val/accuracy": .9610},
             "cola": {"val/mcc": .7145}, "qqp": {"val/accuracy": .9223, "val/f1": .8974},
             "qnli": {"val/accuracy": .9455}, "rte": {"val/accuracy": .8809}, "mrpc": {"val/accuracy": .9069},
             "stsb": {"val/pearson": .9184, "val/spearman": .9100}}
    for task, final in paper.items():
        write_run(tmp_path, "adalora", task, 1, final)
    (table,) = aggregate.summarise(aggregate.collect([tmp_path]))
    assert [c.header for c in table.columns] == ["MNLI", "SST-2", "CoLA", "QQP", "QNLI", "RTE", "MRPC", "STS-B"]
    assert aggregate.format_avg(table.rows[0]) == "89.31"


def test_best_metrics_option(tmp_path):
    run = write_run(tmp_path, "lora", "rte", 1, {"val/accuracy": 0.70})
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["best"] = {"val/accuracy": 0.75, "val/loss": 0.4}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert aggregate.collect([tmp_path])[0].final["val/accuracy"] == 0.70
    assert aggregate.collect([tmp_path], which="best")[0].final["val/accuracy"] == 0.75
