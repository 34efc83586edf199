"""W&B, read back from an offline run: the full config intact, grouping, per-event tables and rank figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def records(run_dir: Path) -> list[dict]:
    """The offline run's transaction log as JSON records (wandb's own reader: `wandb leet inspect --json`)."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(offline)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.slow
def test_offline_run_holds_the_full_config_grouping_tables_and_figures(shared_tiny_run):
    run_dir = shared_tiny_run  # debug=tiny, logger=wandb, experiment_name=wbtest (tests/conftest.py)
    log = records(run_dir)
    (run,) = [r["run"] for r in log if r["type"] == "run"]
    assert run["run_group"] == "wbtest.tweets.flexlora" and run["job_type"] == "tweets"
    assert {"flexlora", "tweets", "tiny_deberta", "seed42"} <= set(run["tags"])
    config: dict = {}
    for r in log:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    # the composed Hydra config, not the module's hyperparameters (which used to overwrite task with a string)
    assert isinstance(config["task"], dict) and config["task"]["name"] == "tweets"
    assert config["allocator"]["name"] == "flexlora" and config["allocator"]["rank"] == 8
    assert config["trainer"]["max_steps"] == 30 and config["seed"] == 42
    media = run_dir.glob("wandb/offline-run-*/files/media")
    (media,) = list(media)
    events = json.loads((run_dir / "metrics.json").read_text())["events"]
    tables = sorted(media.glob("table/alloc/event_table_*.table.json"))
    assert len(tables) == events > 0
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "matrix", "layer", "module_type", "live_rank", "importance", "pruned",
                                "grown", "skipped_full"]
    assert len(table["data"]) == 12 and sum(row[6] for row in table["data"]) == 4  # 4 matrices pruned per event
    for name in ("final_rank_heatmap", "final_rank_dynamics", "importance"):
        assert list(media.glob(f"images/alloc/{name}_*.png")), name
    # the learning rate comes from Lightning's LearningRateMonitor
    history_keys = {k for r in log if r["type"] == "history" for k in r["history"]["item"]}
    assert any(k.startswith("lr-") for k in history_keys), sorted(history_keys)[:20]
