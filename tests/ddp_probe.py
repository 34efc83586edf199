"""Run by tests/test_ddp.py: 2-process CPU DDP (gloo) with a rank that sees different gradients.

Usage: python tests/ddp_probe.py OUT_JSON RUN_DIR GLUE_DIR
Rank 1 perturbs its lambda gradients after the all-reduce, so its weights and importances drift from
rank 0's; the plan must still come from rank 0 and the masks must stay identical on both ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexlora.train import build
from tests.helpers import tiny_run_config


class Skew(L.Callback):
    """Rank 1 only: different local gradients, and the plan it would have made on its own."""

    def __init__(self) -> None:
        self.local_plans: dict[int, dict] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 1:
            for layer in pl_module.adapters.values():
                layer.lora_E.grad.mul_(-3.0).add_(0.05)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        allocation = next(c for c in trainer.callbacks if type(c).__name__ == "RankAllocationCallback")
        plan = allocation.allocator.plan(pl_module.adapters, trainer.global_step)
        if plan is not None:
            self.local_plans[trainer.global_step] = {"prune": plan.prune, "grow": plan.grow}


class GatherMasks(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = torch.stack([layer.mask.clone() for layer in pl_module.adapters.values()]).long()
        lam = torch.stack([layer.lora_E.detach().clone() for layer in pl_module.adapters.values()])
        gathered = trainer.strategy.all_gather(masks)
        gathered_lam = trainer.strategy.all_gather(lam)
        self.rows.append({
            "step": trainer.global_step,
            "masks_equal": bool(torch.equal(gathered[0], gathered[1])),
            "lambda_differs": bool(not torch.allclose(gathered_lam[0], gathered_lam[1])),
        })


def main() -> None:
    out, run_dir, glue = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    cfg = tiny_run_config(run_dir, glue, "allocator=flexlora", "allocator.budget_per_event=2", "trainer=ddp",
                          "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=14")
    datamodule, module, trainer, allocation = build(cfg)
    skew, gather = Skew(), GatherMasks()
    # order: skew grads before the allocator observes; record rank 1's own plan before the broadcast one is
    # applied; gather masks after it is applied
    trainer.callbacks[:] = [skew, *trainer.callbacks, gather]
    trainer.fit(module, datamodule=datamodule)
    result = {"rank": trainer.global_rank, "events": allocation.events, "rows": gather.rows,
              "own_plans": {str(k): v for k, v in skew.local_plans.items()},
              "applied": [{"step": r["step"], "pruned": r["pruned"], "grown": r["grown"]}
                          for r in allocation.event_log.events()]}
    Path(f"{out}.rank{trainer.global_rank}").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
