"""Export a run's adapter as a stock peft LoRA adapter (and optionally the merged model).

    python -m flexlora.export --run RUN_DIR --out OUT_DIR [--merge] [--ckpt PATH]

Each adapter is compacted to its live slots; lambda is folded into A (``A' = diag(lambda) A``), and
``rank_pattern`` / ``alpha_pattern`` give every module peft's scale ``alpha_k / r_k = alpha / r0``, the
constant training scale. The task head goes in ``modules_to_save``. peft itself writes the files
(``save_pretrained``), so the folder is exactly what ``PeftModel.from_pretrained`` expects. The adapter names
its base model by the backbone's hub id (``base_model_name_or_path``), so it travels to other machines; a
backbone built from a config (no pretrained weights anywhere) is saved beside the adapter as ``base_model/``.
``README.md`` is a model card: method and allocator config, task, final metrics, rank pattern, how to load.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexlora.adapters import SlotLoRALayer
from flexlora.errors import FlexLoRAError
from flexlora.rundir import METRICS, RANK_PATTERN, TRAINED_STATE, atomic_write_text, load_trained_state

log = logging.getLogger("flexlora.export")


def load_run(run_dir: Path, ckpt: Path | None = None):
    """Rebuild the run's module with its trained weights (final state, or a Lightning checkpoint)."""
    from flexlora.training.module import AdaptedBackboneModule

    metrics_path = run_dir / METRICS
    if not metrics_path.is_file():
        raise FlexLoRAError(f"{run_dir} has no metrics.json: pass the folder of a finished run (hydra run dir)")
    config = json.loads(metrics_path.read_text())["config"]
    module = AdaptedBackboneModule(
        backbone=config["backbone"], allocator=config["allocator"], task=config["task"],
        optimizer=lambda groups: None, seed=config["seed"],
    )
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    else:
        path = run_dir / TRAINED_STATE
        if not path.is_file():
            raise FlexLoRAError(f"{path} is missing; export from a checkpoint with --ckpt <run>/checkpoints/last.ckpt")
        state = load_trained_state(run_dir)
    module.load_trained_state_dict(state)
    return module.eval(), config


def unwrap(model: nn.Module) -> nn.Module:
    """A copy of the model with every adapter replaced by its (frozen) base layer."""
    plain = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in plain.named_modules() if isinstance(m, SlotLoRALayer)]:
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name) if parent_name else plain, child, layer.base)
    return plain


def compact(layer: SlotLoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of the live slots with lambda folded into A: dW = scale * B' A'."""
    live = layer.mask
    a = layer.lora_A.detach()[live]
    if layer.lora_E is not None:
        a = layer.lora_E.detach()[live].unsqueeze(1) * a
    return a.clone(), layer.lora_B.detach()[:, live].clone()


def to_peft(module: Any):
    """A peft ``PeftModelForSequenceClassification`` (or causal LM) holding exactly the run's trained adapter."""
    from flexlora.family_registry import family_entry

    head = list(module.family.backbone.head_modules)
    task_type = family_entry(module.family.spec.family).peft_task_type
    return adapted_to_peft(module.model, module.adapters, head, task_type=task_type)


def adapted_to_peft(model: nn.Module, adapters: dict[str, SlotLoRALayer], head_modules: list[str],
                    task_type: str | None = None):
    """(peft model, rank pattern) of any model adapted by :func:`flexlora.adapters.inject`: each adapter
    compacted to its live slots, the head in ``modules_to_save``; ``task_type`` is peft's (e.g. ``SEQ_CLS``)."""
    from peft import LoraConfig, get_peft_model

    ranks = {name: layer.live_rank for name, layer in adapters.items()}
    live = {name: r for name, r in ranks.items() if r > 0}
    if not live:
        raise FlexLoRAError("every adapter has rank 0: there is nothing to export")
    first = next(iter(adapters.values()))
    scale = first.scale
    default_r = Counter(live.values()).most_common(1)[0][0]
    peft_config = LoraConfig(
        task_type=task_type,
        r=default_r,
        lora_alpha=default_r * scale,
        target_modules=sorted(live),
        rank_pattern=dict(live),
        alpha_pattern={name: r * scale for name, r in live.items()},
        lora_dropout=first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in adapters.values()),
        modules_to_save=list(head_modules),
        bias="none",
    )
    base = unwrap(model)
    peft_model = get_peft_model(base, peft_config)
    with torch.no_grad():
        for name in live:
            target = peft_model.base_model.model.get_submodule(name)
            a, b = compact(adapters[name])
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)
            assert abs(target.scaling["default"] - scale) < 1e-12 * max(1.0, scale)
    return peft_model.eval(), ranks


def base_reference(backbone: dict[str, Any]) -> str | None:
    """What the adapter names as its base model: the hub id where the backbone has one, so the folder loads
    on any machine; a local folder only when the weights exist nowhere else (None: ship them)."""
    from flexlora.backbones.hub import resolve_pretrained

    if backbone.get("hub_id"):
        return str(backbone["hub_id"])
    if backbone.get("pretrained"):
        return resolve_pretrained(backbone["pretrained"])
    return None


def _save_preprocessor(module: Any, backbone: dict[str, Any], folder: Path) -> None:
    from flexlora.family_registry import family_entry

    entry = family_entry(module.family.spec.family)
    if entry.preprocessor is not None:
        entry.resolve(entry.preprocessor)(backbone).save_pretrained(folder)


def export(run_dir: Path, out_dir: Path, merge: bool = False, ckpt: Path | None = None) -> dict[str, Any]:
    from flexlora.modelcard import model_card

    module, config = load_run(run_dir, ckpt)
    peft_model, ranks = to_peft(module)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = config["backbone"]
    base_ref = base_reference(backbone)
    if base_ref is None:  # built from a config: ship the exact base weights so peft can load onto them
        base_dir = out_dir / "base_model"
        unwrap(module.model).save_pretrained(base_dir)
        base_ref = str(base_dir.resolve())
    peft_model.peft_config["default"].base_model_name_or_path = base_ref
    peft_model.save_pretrained(out_dir)
    metrics = json.loads((run_dir / METRICS).read_text())
    atomic_write_text(out_dir / "README.md", model_card(metrics, ranks, base_ref, module.family.spec.family))
    atomic_write_text(out_dir / RANK_PATTERN, json.dumps(ranks, indent=2))
    _save_preprocessor(module, backbone, out_dir)
    summary = {"out": str(out_dir), "base_model": base_ref, "matrices": len(ranks), "total_rank": sum(ranks.values())}
    if merge:
        merged = copy.deepcopy(peft_model).merge_and_unload()
        merged.save_pretrained(out_dir / "merged")
        _save_preprocessor(module, backbone, out_dir / "merged")
        summary["merged"] = str(out_dir / "merged")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexlora.export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run folder (contains metrics.json)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the peft adapter")
    parser.add_argument("--merge", action="store_true", help="also write the merged model to OUT/merged")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="export this Lightning checkpoint instead of the run's final state")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = export(args.run, args.out, merge=args.merge, ckpt=args.ckpt)
    except FlexLoRAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
