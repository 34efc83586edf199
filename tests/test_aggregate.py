"""flexlora-aggregate (flexlora.aggregate and its console script) on synthetic run folders with known numbers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import flexlora.aggregate as aggregate
from flexlora.aggregate.cli import main
from flexlora.aggregate.compare import compare
from flexlora.errors import FlexLoRAError

REPO = Path(__file__).resolve().parents[1]

PARAMS = {"lora": 1_330_000, "adalora": 1_270_000, "flexlora": 1_900_000}


def write_run(root: Path, allocator: str, task: str, seed: int, final: dict | None, backbone: str = "deberta_v3_base",
              task_config: dict | None = None, extra: dict | None = None, name: str = "", **config) -> Path:
    run = root / (name or f"{allocator}-{task}-s{seed}-{backbone}")
    run.mkdir(parents=True)
    metrics = {"trainable_params": PARAMS.get(allocator, 1000), "total_rank": 96, "events": 3,
               "config": {"allocator": {"name": allocator, **config}, "task": {"name": task, **(task_config or {})},
                          "backbone": {"name": backbone}, "seed": seed, "experiment_name": "test"},
               **(extra or {})}
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


def test_runs_without_final_are_skipped_with_a_warning(sweep, tmp_path, capsys):
    write_run(sweep, "flexlora", "rte", 4, None)
    (sweep / "broken").mkdir()  # a half-written metrics.json, and a partial write that never counts
    (sweep / "broken" / "metrics.json").write_text('{"final": {"val/accuracy": 0.8')
    (sweep / "broken" / "metrics.json.tmp").write_text("{}")
    skipped: list[str] = []
    runs = aggregate.collect([sweep], skipped=skipped)
    assert len(runs) == 11  # 3 + 2 + 2 + 2 + 2; the unfinished seed 4 is not among them
    assert 4 not in {r.seed for r in runs}
    assert "no 'final' metrics" in capsys.readouterr().err
    assert len(skipped) == 2 and "broken/metrics.json: unreadable" in " ".join(skipped)
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert "Unfinished or unreadable runs (skipped):" in capsys.readouterr().out


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
    proc = subprocess.run([str(Path(sys.executable).with_name("flexlora-aggregate")), str(sweep), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
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
    assert main([str(tmp_path)]) == 1


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


# ---------------------------------------------------------------- other families

SETS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")


def commonsense_final(base: float, sets=SETS) -> dict:
    final = {f"{s}/accuracy": base + i / 100 for i, s in enumerate(sets)}
    final["avg/accuracy"] = sum(final.values()) / len(final)
    return final


def test_commonsense_table_order_avg_and_star(tmp_path):
    for seed, base in ((1, 0.60), (2, 0.62)):
        write_run(tmp_path, "lora", "commonsense", seed, commonsense_final(base), backbone="llama3_8b",
                  task_config={"eval_sets": list(SETS)})
    # flexlora evaluated three sets only, listed out of order in its config
    write_run(tmp_path, "flexlora", "commonsense", 1, commonsense_final(0.70, ("winogrande", "boolq", "piqa")),
              backbone="llama3_8b", task_config={"eval_sets": ["winogrande", "boolq", "piqa"]})
    (table,) = aggregate.summarise(aggregate.collect([tmp_path]))
    assert table.kind == "commonsense" and table.title == "Commonsense reasoning — llama3_8b"
    lora, flex = rows_by_name(table)["lora"], rows_by_name(table)["flexlora"]
    assert aggregate.format_cell(lora.cells["boolq"]) == "61.00 ± 1.41 (n=2)"
    assert lora.avg == pytest.approx(61.0 + 3.5) and aggregate.format_avg(lora) == "64.50"  # mean of 61 .. 68
    assert flex.avg == pytest.approx(71.0) and aggregate.format_avg(flex) == "71.00*"  # 70, 71, 72
    md = aggregate.render_markdown([table])
    assert "| Method (# Params) | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Avg |" in md
    assert "| FlexLoRA (1.90M) | 71.00 (n=1) | 72.00 (n=1) | – | – | 70.00 (n=1) | – | – | – | 71.00* |" in md
    assert "not all 8" in md and "FlexLoRA SIQA: no runs" in md


def write_vtab(root: Path, allocator: str, folder: str, seed: int, acc: float) -> Path:
    return write_run(root, allocator, "vtab", seed, {"test/accuracy": acc}, backbone="vit_b16",
                     task_config={"data_dir": f"/data/vtab-1k/{folder}"}, name=f"{allocator}-{folder}-s{seed}")


def test_vtab_table_group_means_and_average(tmp_path):
    from flexlora.data.vtab import VTAB_TASKS

    # natural tasks 0.70, specialized 0.80, structured 0.50 (flexlora); lora lacks dmlab
    for folder, task in VTAB_TASKS.items():
        acc = {"Natural": 0.70, "Specialized": 0.80, "Structured": 0.50}[task.group]
        write_vtab(tmp_path, "flexlora", folder, 1, acc)
        if folder != "dmlab":
            write_vtab(tmp_path, "lora", folder, 1, acc - 0.1)
    (table,) = aggregate.summarise(aggregate.collect([tmp_path]))
    assert table.kind == "vtab" and table.show_avg and table.title == "VTAB-1k — vit_b16"
    assert [c.header for c in table.columns][:3] == ["Cifar100", "Caltech101", "DTD"] and len(table.columns) == 19
    assert table.extra_headers == ["Natural", "Specialized", "Structured", "Mean (19 tasks)"]
    flex, lora = rows_by_name(table)["flexlora"], rows_by_name(table)["lora"]
    assert [flex.extras[g] for g in ("Natural", "Specialized", "Structured")] == pytest.approx([70.0, 80.0, 50.0])
    assert flex.avg == pytest.approx((70 + 80 + 50) / 3)  # the mean of group means ...
    assert flex.extras["Mean (19 tasks)"] == pytest.approx((7 * 70 + 4 * 80 + 8 * 50) / 19)  # ... not of tasks
    assert lora.extras["Structured"] is None and lora.avg is None and lora.extras["Natural"] == pytest.approx(60.0)
    markdown = aggregate.render_markdown([table])
    assert "| Natural | Specialized | Structured | Mean (19 tasks) | Avg |" in markdown
    assert "LoRA DMLab: no runs" in markdown


def test_vtab_incomplete_groups_note(tmp_path):
    for folder in ("cifar", "dtd", "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"):
        write_vtab(tmp_path, "adalora", folder, 1, 0.9)
        write_vtab(tmp_path, "adalora", folder, 2, 0.8)
    (table,) = aggregate.summarise(aggregate.collect([tmp_path]))
    assert [c.header for c in table.columns] == ["Cifar100", "DTD", "Camelyon", "EuroSAT", "Resisc45", "Retinopathy"]
    assert not table.show_avg and table.extra_headers == ["Specialized"]
    assert table.rows[0].extras == {"Specialized": pytest.approx(85.0)}
    markdown = aggregate.render_markdown([table])
    assert "| AdaLoRA (1.27M) | 85.00 ± 7.07 (n=2) |" in markdown and "Avg |" not in markdown
    assert "| Retinopathy | Specialized |\n" in markdown
    note = next(n for n in table.notes if n.startswith("Incomplete groups"))
    assert "Natural (2 of 7 tasks; missing Caltech101" in note and "Structured (0 of 8 tasks" in note
    assert "Specialized (" not in note


def test_rank_recovery_table_per_spectrum(tmp_path):
    for spectrum, shift in (("flat", 0.0), ("decaying", 0.1)):
        for allocator, base in (("lora", 2e-3), ("flexlora", 1e-3)):
            for seed in (1, 2):
                write_run(tmp_path / spectrum, allocator, "rank_recovery", seed,
                          {"val/mse": base * seed, "val/relative_mse": 0.1 * seed, "rank/spearman": 0.5 + shift,
                           "rank/energy": 0.9 - shift}, backbone="teacher", task_config={"spectrum": spectrum})
    tables = aggregate.summarise(aggregate.collect([tmp_path]))
    assert [t.kind for t in tables] == ["rank_recovery/flat", "rank_recovery/decaying"]
    flat = tables[0]
    assert flat.title == "Rank recovery — teacher, flat spectrum" and not flat.show_avg and not flat.plot
    flex = rows_by_name(flat)["flexlora"]
    assert aggregate.format_cell(flex.cells["val/mse"]) == "0.0015 ± 0.000707 (n=2)"
    assert aggregate.format_cell(flex.cells["rank/energy"]) == "0.900 ± 0.000 (n=2)"
    assert aggregate.format_cell(rows_by_name(tables[1])["lora"].cells["rank/spearman"]) == "0.600 ± 0.000 (n=2)"
    markdown = aggregate.render_markdown(tables)
    assert "| Method (# Params) | MSE ↓ | Rel. MSE ↓ | Spearman ↑ | Energy ↑ |" in markdown
    # --rows keys make the rows; only the metrics the runs logged become columns
    for imp, energy in (("entropy", 0.9), ("random", 0.6)):
        write_run(tmp_path / "ablation" / imp, "flexlora", "rank_recovery", 1, {"val/mse": 0.01, "rank/energy": energy},
                  backbone="teacher", task_config={"spectrum": "decaying"}, importance=imp)
    rows = ("allocator.name", "allocator.importance")
    (table,) = aggregate.summarise(aggregate.collect([tmp_path / "ablation"], rows), rows)
    assert [r.label for r in table.rows] == ["FlexLoRA importance=entropy (1.90M)",
                                             "FlexLoRA importance=random (1.90M)"]
    assert [c.header for c in table.columns] == ["MSE", "Energy"]


def test_degenerate_runs_are_marked_and_listed(tmp_path):
    why = {"degenerate": {"val": True}, "degenerate_reason": {"val": "every example predicted class 1"}}
    write_run(tmp_path, "lora", "cola", 1, {"val/mcc": 0.0}, extra=why)
    write_run(tmp_path, "lora", "cola", 2, {"val/mcc": 0.5}, extra={"degenerate": {"val": False}})
    write_run(tmp_path, "lora", "stsb", 1, {"val/pearson": float("nan")}, extra={"degenerate": {"val": True}})
    write_run(tmp_path, "lora", "stsb", 2, {"val/pearson": 0.8})
    for seed, base in ((1, 0.6), (2, 0.62)):  # commonsense: only the flagged set's cell is marked
        write_run(tmp_path, "lora", "commonsense", seed, commonsense_final(base, ("boolq", "piqa")),
                  backbone="llama", extra={"degenerate": {"boolq": seed == 1, "piqa": False}})
    glue, common = aggregate.summarise(aggregate.collect([tmp_path]))
    (row,) = glue.rows
    assert aggregate.format_cell(row.cells["cola"]) == "25.00 ± 35.36 (n=2)†" and row.cells["cola"].degenerate == [1]
    assert aggregate.format_cell(row.cells["stsb"]) == "80.00 (n=1 of 2)†"  # NaN left out, not averaged as 0
    md = aggregate.render_markdown([glue, common])
    assert all(text in md for text in ("† Degenerate", "CoLA seed 1 (val: every example", "STS-B seed 1 (val)", "NaN"))
    cells = common.rows[0].cells
    assert aggregate.format_cell(cells["boolq"]).endswith("†") and cells["piqa"].degenerate == []


# ---------------------------------------------------------------- --compare

def write_predictions(run: Path, split: str, labels, preds) -> None:
    lines = [json.dumps({"split": split, "idx": i, "label": y, "prediction": p, "score": 0.5})
             for i, (y, p) in enumerate(zip(labels, preds, strict=True))]
    (run / "predictions.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def paired(tmp_path) -> Path:
    """RTE, 3 seeds, 400 examples: both methods right on the same 60 %; A also right on a constructed 25 % where
    B is wrong, B right only on 5 % where A is wrong: A - B = +20 points, seed noise aside."""
    root, labels = tmp_path / "paired", np.arange(400) % 2
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        kind = rng.permutation(np.repeat([0, 1, 2, 3], [240, 100, 20, 40]))  # both, A only, B only, neither
        a = np.where((kind == 0) | (kind == 1), labels, 1 - labels)
        b = np.where((kind == 0) | (kind == 2), labels, 1 - labels)
        for allocator, pred in (("flexlora", a), ("lora", b)):
            run = write_run(root, allocator, "rte", seed, {"val/accuracy": float((pred == labels).mean())},
                            extra={"predictions": "predictions.jsonl", "degenerate": {"val": False}})
            write_predictions(run, "val", labels.tolist(), pred.tolist())
    return root


def test_compare_finds_the_better_method(paired, tmp_path, capsys):
    runs = aggregate.collect([paired])
    (row,) = compare(runs, "flexlora", "lora", ("allocator.name",), n_resamples=2000, seed=3).rows
    r = row.result
    assert row.seeds == [1, 2, 3] and r.metric == "accuracy" and r.mean_diff == pytest.approx(0.20)
    assert 0 < r.low < 0.20 < r.high and (r.agree, r.n_seeds) == (3, 3) and all(s.p_value < 0.01 for s in r.per_seed)
    assert main([str(paired), "--compare", "flexlora,lora", "--resamples", "1000", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "## Paired bootstrap: FlexLoRA − LoRA" in printed and "| Agree | p | Per-seed p |" in printed
    assert "| deberta_v3_base | RTE | accuracy | 400 | 1, 2, 3 | +20.00 | [+" in printed and "| 3/3 |" in printed
    assert json.loads((tmp_path / "compare.json").read_text())["rows"][0]["agree"] == 3
    reverse = compare(runs, "lora", "flexlora", ("allocator.name",), n_resamples=500)  # the mirror image
    assert reverse.rows[0].result.mean_diff == pytest.approx(-0.20)


def test_compare_rejects_misaligned_predictions(paired, capsys):
    run = paired / "lora-rte-s2-deberta_v3_base"
    lines = (run / "predictions.jsonl").read_text().splitlines()
    (run / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # one example fewer
    with pytest.raises(FlexLoRAError, match="examples differ"):
        compare(aggregate.collect([paired]), "flexlora", "lora", ("allocator.name",), n_resamples=100)
    assert main([str(paired), "--compare", "flexlora,lora", "--resamples", "100"]) == 2
    assert "examples differ" in capsys.readouterr().err
    (run / "predictions.jsonl").write_text(lines[0].replace('"label": 0', '"label": 1') + "\n" + "\n".join(lines[1:]))
    with pytest.raises(FlexLoRAError, match="labels differ"):
        compare(aggregate.collect([paired]), "flexlora", "lora", ("allocator.name",), n_resamples=100)


def test_compare_degenerate_and_missing_predictions(paired):
    """LoRA seed 3 predicts a constant class, FlexLoRA seed 1 has no predictions.jsonl."""
    write_predictions(paired / "lora-rte-s3-deberta_v3_base", "val", (np.arange(400) % 2).tolist(), [0] * 400)
    (paired / "flexlora-rte-s1-deberta_v3_base" / "predictions.jsonl").unlink()
    report = compare(aggregate.collect([paired]), "flexlora", "lora", ("allocator.name",), n_resamples=500)
    assert [(r.seeds, r.with_degenerate) for r in report.rows] == [([2], False), ([2, 3], True)]
    notes = " ".join(report.notes)
    assert "No predictions.jsonl, skipped (1 runs)" in notes and "flexlora-rte-s1-deberta_v3_base" in notes
    assert "RTE seed 3: degenerate (constant predictions) for LoRA" in notes


def test_compare_commonsense_label_words_and_rows_keys(tmp_path):
    golds = ["true", "false"] * 50
    for seed in (1, 2):
        for importance, good in (("entropy", 80), ("random", 50)):
            preds = [g if i < good else (None if i % 3 == 0 else ("false" if g == "true" else "true"))
                     for i, g in enumerate(golds)]
            run = write_run(tmp_path, "flexlora", "commonsense", seed, {"boolq/accuracy": good / 100},
                            backbone="llama", name=f"{importance}-s{seed}", importance=importance,
                            task_config={"eval_sets": ["boolq"]})
            write_predictions(run, "boolq", golds, preds)
    write_run(tmp_path, "lora", "commonsense", 1, {"boolq/accuracy": 0.5}, backbone="llama", name="lora-s1")
    runs = aggregate.collect([tmp_path], rows := ("allocator.name", "allocator.importance"))
    with pytest.raises(FlexLoRAError, match="several rows"):
        compare(runs, "flexlora", "lora", rows)
    with pytest.raises(FlexLoRAError, match="no run matches 'dora'"):
        compare(runs, "dora", "lora", rows)
    report = compare(runs, "entropy", "flexlora:random", rows, n_resamples=500)
    assert report.name_a == "FlexLoRA importance=entropy" and [r.unit.label for r in report.rows] == ["BoolQ"]
    assert report.rows[0].result.mean_diff == pytest.approx(0.30)  # None (nothing extracted) counts as wrong


def test_console_script_entry_point(capsys):
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert 'flexlora-aggregate = "flexlora.aggregate.cli:main"' in scripts and "flexlora-export" in scripts
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--compare A,B" in capsys.readouterr().out
