"""notebooks/rank_dynamics.ipynb executes on a fresh tiny FlexLoRA run (nbclient, a real Jupyter kernel)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexlora.train import train
from tests.helpers import tiny_run_config

pytestmark = pytest.mark.slow  # end-to-end tier: python -m pytest (README)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "rank_dynamics.ipynb"

nbformat = pytest.importorskip("nbformat")


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_rank_dynamics_notebook_runs(tmp_path, glue_dir, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    run_dir = tmp_path / "run"
    train(tiny_run_config(run_dir, glue_dir, "allocator=flexlora"))
    events = json.loads((run_dir / "metrics.json").read_text())["events"]
    assert events == 15
    monkeypatch.setenv("RUN_DIR", str(run_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"run: {run_dir}" in text and f"events: {events}" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # ranks over training, importance over events, final layers x module types
