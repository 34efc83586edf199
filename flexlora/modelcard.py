"""The README.md of an exported adapter: what was trained, how well, with which ranks, and how to load it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from flexlora.allocators.config import load_methods
from flexlora.family_registry import family_entry


def model_card(metrics: Mapping[str, Any], ranks: Mapping[str, int], base_ref: str, family: str) -> str:
    config = metrics.get("config", {})
    allocator = dict(config.get("allocator", {}))
    task = config.get("task", {})
    method = load_methods().get(str(allocator.get("name")))
    label = method.label if method else str(allocator.get("name"))
    values = list(ranks.values())
    spread = Counter(values)
    entry = family_entry(family)
    loader = entry.auto_class
    final = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.get("final", {}).items()}
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base_ref}",
        "tags: [lora, flexlora, " + str(allocator.get("name")) + "]",
        "---",
        "",
        f"# {label} adapter: {config.get('backbone', {}).get('name')} on {task.get('name')}",
        "",
        f"A LoRA adapter trained with **{label}** rank allocation by "
        "[flexlora](https://github.com/) and exported to the stock peft LoRA format: each matrix keeps its own "
        "rank (`rank_pattern`), and `alpha_pattern` keeps the training scale alpha / r0 for every matrix.",
        "",
        "## Training",
        "",
        f"- task: `{task.get('name')}`" + (f" (data: `{task.get('data_dir')}`)" if task.get("data_dir") else ""),
        f"- seed {config.get('seed')}, {metrics.get('steps')} optimizer steps, {metrics.get('events')} allocation "
        "events",
        "- allocator config:",
        "",
        "```json",
        json.dumps(allocator, indent=2, sort_keys=True),
        "```",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in final.items()],
        "",
        "## Rank pattern",
        "",
        f"{len(values)} adapted matrices, total rank {sum(values)}, ranks {min(values)}..{max(values)} "
        f"(mean {sum(values) / len(values):.2f}); rank: count = "
        + ", ".join(f"{r}: {n}" for r, n in sorted(spread.items())) + ". Per matrix: `rank_pattern.json`.",
        "",
        "## Load",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {loader}",
        "",
        f'base = {loader}.from_pretrained("{base_ref}"' + (", num_labels=...)" if entry.head_size_argument else ")"),
        'model = PeftModel.from_pretrained(base, "<this folder>")',
        "model = model.merge_and_unload()  # optional: plain weights, no peft at inference",
        "```",
        "",
    ]
    if config.get("backbone", {}).get("gguf_file"):
        lines += ["Note: training used the GGUF-quantised weights dequantised to float32; the hub weights named "
                  "above differ slightly from them, so outputs on the hub model are close to, not equal to, the "
                  "run's.", ""]
    return "\n".join(lines)
