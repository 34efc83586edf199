"""flexlora-aggregate on a run the framework trained (the session's shared tiny run), not on written metrics files:
the table row, its number and the CSV come from the run folder as train() left it."""

from __future__ import annotations

import csv
import json

from flexlora.aggregate.cli import main as aggregate


def test_aggregate_reads_a_trained_run_folder(shared_tiny_run, tmp_path, capsys):
    metrics = json.loads((shared_tiny_run / "metrics.json").read_text())
    accuracy = 100 * metrics["final"]["val/accuracy"]
    out = tmp_path / "table"
    assert aggregate([str(shared_tiny_run), "--out", str(out)]) in (0, None)
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| FlexLoRA"))
    assert f"{accuracy:.2f}" in row, row
    (entry,) = [r for r in csv.DictReader((out / "results.csv").open()) if r["task"] == "tweets"]
    assert entry["allocator.name"] == "flexlora" and float(entry["mean"]) == round(accuracy, 4)
    assert entry["seeds"] == str(metrics["config"]["seed"])
