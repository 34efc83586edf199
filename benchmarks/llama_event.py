"""One FlexLoRA event on the 160 LLaMA-3-8B-shaped matrices at r0 32 (capacity 64), and what capacity costs.

No backbone: the frozen bases are shape-only stand-ins, the adapters, their gradients and a SlotAdamW that
has stepped once are real tensors (float32 when the machine has the memory, else bfloat16, recorded).
The memory cost of the slot capacity is computed from the shapes: adapter parameters, gradients and Adam
moments all have the capacity's shape, while forward, backward and the optimizer only touch live slots.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from typing import Any

import torch

from benchmarks.allocator_cost import TOTAL_STEPS, flexlora_event, stepped_optimizer
from benchmarks.config import allocator_values
from benchmarks.harness import median, mem_available_bytes, run_rounds, sample_stats
from benchmarks.modes import FLEXLORA, Mode
from benchmarks.slots import LLAMA3_8B, LLAMA3_8B_LAYERS, layer_shapes, synthetic_adapters
from flexlora.allocators import FlexLoRAAllocator, build_allocator
from flexlora.allocators.config import DEFAULT_CAPACITY

RANK = 32
CAPACITY = DEFAULT_CAPACITY * RANK  # FlexLoRA's default slot capacity at r0 32
# tensors the size of the adapters while the event runs: parameters, gradients, two Adam moments, and the
# snapshot's copies of parameters and moments
COPIES_IN_MEMORY = 7


def slot_elements(shapes: Mapping[str, tuple[int, int]], capacity: int) -> int:
    """Numbers held by SVD-form adapters of ``capacity`` slots: P columns, Q rows and lambdas."""
    return sum(capacity * (d_in + d_out + 1) for d_in, d_out in shapes.values())


def capacity_memory(shapes: Mapping[str, tuple[int, int]], capacity: int, bytes_per: int = 4) -> dict[str, int]:
    """Bytes of one capacity's adapter state: parameters, gradients (autograd writes the full tensor), Adam's
    two moments, SlotAdamW's per-slot step counts (float32, one per slot per slot tensor)."""
    params = slot_elements(shapes, capacity) * bytes_per
    steps = 3 * capacity * len(shapes) * 4
    parts = {"params": params, "gradients": params, "adam_moments": 2 * params, "step_counts": steps}
    return {**parts, "params_plus_moments": params + 2 * params + steps, "total": sum(parts.values())}


def memory_cost(shapes: Mapping[str, tuple[int, int]], live: int, capacity: int) -> dict[str, Any]:
    at_capacity, at_live = capacity_memory(shapes, capacity), capacity_memory(shapes, live)
    return {
        "what": "float32 bytes computed from the shapes; live slots set the compute, capacity sets the memory",
        f"capacity_{capacity}": at_capacity, f"capacity_{live}": at_live,
        "extra_params_plus_moments_bytes": at_capacity["params_plus_moments"] - at_live["params_plus_moments"],
        "extra_with_gradients_bytes": at_capacity["total"] - at_live["total"],
        "ratio_params_plus_moments": at_capacity["params_plus_moments"] / at_live["params_plus_moments"],
        "adapted_base_weights_bf16_bytes": sum(2 * d_in * d_out for d_in, d_out in shapes.values()),
    }


def _dtype_for(shapes: Mapping[str, tuple[int, int]]) -> tuple[torch.dtype, str]:
    need = COPIES_IN_MEMORY * slot_elements(shapes, CAPACITY) * 4
    available = mem_available_bytes()
    if available and need * 1.5 > available:
        return torch.bfloat16, (f"bfloat16: float32 needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB "
                                "available")
    return torch.float32, f"float32 (~{need / 2**30:.1f} GiB needed, {available / 2**30:.1f} GiB available)"


def bench_llama_event(mode: Mode) -> dict[str, Any]:
    shapes = layer_shapes(LLAMA3_8B, mode.llama_layers)
    dtype, dtype_note = _dtype_for(shapes)
    allocator = build_allocator(allocator_values(f"allocator={FLEXLORA}", f"allocator.rank={RANK}",
                                                 f"allocator.max_rank={CAPACITY}", "allocator.t_init=0",
                                                 "allocator.t_final=0"))
    assert isinstance(allocator, FlexLoRAAllocator)
    started = time.perf_counter()
    adapters = synthetic_adapters(shapes, rank=RANK, max_rank=CAPACITY, seed=3, dtype=dtype)
    optimizer = stepped_optimizer(adapters)
    allocator.bind(adapters, TOTAL_STEPS)
    step = allocator.event_steps()[len(allocator.event_steps()) // 2]
    phases: dict[str, list[float]] = {"plan": [], "apply_event": []}
    bench = flexlora_event(allocator, adapters, optimizer, step, phases)
    setup_s = time.perf_counter() - started
    samples = run_rounds({"event": bench}, [["event"]], mode.micro_rounds, mode.micro_calls)
    allocated = sum(t.numel() * t.element_size() for layer in adapters.values() for p, _ in layer.slot_params()
                    for t in (p, *(v for k, v in optimizer.state[p].items() if k != "step")))
    out: dict[str, Any] = {
        "setup": {
            "shapes": f"Meta-Llama-3-8B: {mode.llama_layers} layers x (q 4096x4096, k and v 4096->1024, "
                      "up 4096->14336, down 14336->4096)",
            "matrices": len(shapes), "rank": RANK, "max_rank": CAPACITY,
            "budget_per_event": allocator.config.budget_per_event, "step": step, "dtype": dtype_note,
            "setup_s": round(setup_s, 1), "rounds": mode.micro_rounds, "calls_per_round": mode.micro_calls,
            "allocated_params_plus_moments_bytes": allocated,
        },
        "event": {**sample_stats(samples["event"]),
                  "breakdown_ms": {k: 1e3 * median(v) for k, v in phases.items()}},
        "memory": memory_cost(shapes, RANK, CAPACITY),
    }
    if mode.llama_layers != LLAMA3_8B_LAYERS:
        out["setup"]["note"] = f"{mode.llama_layers} of the model's {LLAMA3_8B_LAYERS} layers (quick mode)"
    del adapters, optimizer, bench
    gc.collect()
    return out
