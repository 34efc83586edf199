"""A fault-injection campaign: kill a tiny run at random moments, rerun the same command, compare.

    python -m tests.fault_campaign --kills 24 [--seed 7]

Each kill picks a point (between steps, inside an allocation event, during a checkpoint write, during an
evaluation) and a passage at random; the killed run is rerun with the same command in the same folder and must
finish like the uninterrupted reference (see tests/test_faults.py, which uses the same helpers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "OMP_NUM_THREADS": "1"}
ENV.pop("FLEXLORA_FAULT", None)


def command(run_dir: Path, glue_dir: Path, *extra: str) -> list[str]:
    """A tiny FlexLoRA run with periodic checkpoints (every 4 steps) and validation at steps 10 and 20."""
    return [sys.executable, "run.py", "debug=tiny", "task=rte", f"task.data_dir={glue_dir / 'RTE'}",
            "allocator.delta_t=1", "trainer.max_steps=24", "trainer.val_check_interval=10",
            "callbacks=default", "callbacks.progress_bar=null", "callbacks.model_checkpoint.every_n_train_steps=4",
            "ckpt_path=auto", f"hydra.run.dir={run_dir}", *extra]


def launch(run_dir: Path, glue_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "FLEXLORA_FAULT": fault} if fault else ENV
    return subprocess.run(command(run_dir, glue_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def outcome(run_dir: Path) -> dict:
    for path in run_dir.rglob("*.json"):
        json.loads(path.read_text())  # every JSON file of the run folder parses
    metrics = json.loads((run_dir / "metrics.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "ranks.jsonl").read_text().splitlines()]
    return {"ranks": metrics["rank_pattern"], "final": metrics["final"], "events": metrics["events"],
            "history": [{k: v for k, v in h.items()} for h in metrics["history"]], "log": lines}


def assert_same(got: dict, want: dict) -> None:
    assert got["ranks"] == want["ranks"]
    assert got["events"] == want["events"]
    assert set(got["final"]) == set(want["final"])
    for key, value in want["final"].items():
        assert abs(got["final"][key] - value) <= 1e-4, (key, got["final"][key], value)
    assert [(r["kind"], r["step"], r["ranks"]) for r in got["log"]] == [(r["kind"], r["step"], r["ranks"])
                                                                          for r in want["log"]]
    # A periodic checkpoint taken at a step that also validates is written before that validation (Lightning
    # saves in on_train_batch_end); resuming from it does not repeat the evaluation, so the history may lack it.
    want_history = {h["step"]: h for h in want["history"]}
    for entry in got["history"]:
        assert all(abs(entry[k] - want_history[entry["step"]][k]) <= 1e-4 for k in entry if k != "step")
    assert got["history"][-1]["step"] == want["history"][-1]["step"]




POINTS = {"step": (2, 23), "event": (1, 19), "checkpoint_write": (1, 12), "validation": (1, 5)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    from tests.conftest import glue_root

    parser.add_argument("--glue", type=Path, default=glue_root())
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    top = Path(tempfile.mkdtemp(prefix="faults-"))
    proc = launch(top / "reference", args.glue)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = outcome(top / "reference")
    survived = 0
    for i in range(args.kills):
        point = rng.choice(sorted(POINTS))
        passage = rng.randint(*POINTS[point])
        run_dir = top / f"kill{i}"
        killed = launch(run_dir, args.glue, fault=f"{point}:{passage}")
        ok = killed.returncode == -signal.SIGKILL and not (run_dir / "metrics.json").exists()
        rerun = launch(run_dir, args.glue)
        try:
            assert ok and rerun.returncode == 0, rerun.stderr[-500:]
            assert_same(outcome(run_dir), reference)
            survived += 1
            verdict = "survived"
        except AssertionError as err:
            verdict = f"FAILED: {str(err)[:200]}"
        print(f"kill {i + 1:2d}: {point}:{passage} -> {verdict}", flush=True)
    print(json.dumps({"kills": args.kills, "survived": survived, "seed": args.seed}))
    return 0 if survived == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
