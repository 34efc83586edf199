#!/usr/bin/env python
"""The project's benchmark: what AdaLoRA and FlexLoRA cost over static LoRA, measured side by side.

    python scripts/bench.py                       # full mode: MiniLM-L6 (bundled), writes experiments/benchmarks/
    python scripts/bench.py --quick --out r.json  # seconds-scale smoke run on tiny_deberta (used by the tests)

Every timing figure is a ratio of two things measured in ONE process, interleaved in blocks (A B C D,
B C D A, ...), reduced by medians over repeats: run-to-run drift on a shared machine is ~10 %, so only
same-process interleaved ratios mean anything. Three parts:

1. ``step_time``: time of a training step of adalora and flexlora vs static lora at the same r0, same
   backbone, batch and sequence length, with allocation events (every ``delta_t`` = 10 steps) inside the
   timed window. The runs are real ``lightning.Trainer.fit`` calls built by ``flexlora.train.build`` (so
   RankAllocationCallback, SlotAdamW, the LR scheduler, logging and the rank reporter all run as in
   ``run.py``), each in its own thread; a gate callback parks every run at block boundaries so that exactly
   one trains at a time. A block is ``block_steps`` optimizer steps, timed end-of-step to end-of-step (wall
   clock and the training thread's CPU time); ``delta_t`` consecutive steps (one event each) form a group,
   and a ratio is the median over groups of (group time of the method / same group of lora). A second,
   identical lora run (``lora_control``) measures the noise floor of that ratio. ``step_time.components``
   then times what each method adds per step, piece by piece (adapter path, optimizer, orthogonality
   penalty, callback, events), and predicts the ratio from the pieces.
2. ``allocator_cost``: one FlexLoRA event (plan + apply + surgery), AdaLoRA's per-step scoring (observe) and
   a masking step (observe + plan + apply), on the 72 matrices of DeBERTa-v3-base without a backbone,
   next to peft's ``RankAllocator.update_and_allocate`` on the same shapes, weights and gradients.
3. ``memory``: peak resident memory of each allocator's short training run vs lora, each run in its own
   forked process (the kernel's VmHWM is reset right before ``trainer.fit``), plus the bytes of the training
   state (trainable tensors, their gradients, optimizer state, allocator state).
"""

from __future__ import annotations

import os

for _key, _value in {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)

METHODS = ("lora", "adalora", "flexlora")
RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
DEFAULT_OUT = REPO / "experiments" / "benchmarks" / "results.json"
TARGETS = {  # name: (limit, unit)
    "flexlora_step_vs_lora": (1.02, "x"),
    "adalora_step_vs_lora": (1.02, "x"),
    "adalora_scoring_ms": (12.0, "ms"),
    "adalora_masking_step_ms": (20.0, "ms"),
    "flexlora_event_ms": (5.0, "ms"),
    "flexlora_peak_rss_vs_lora": (1.05, "x"),
    "adalora_peak_rss_vs_lora": (1.05, "x"),
}


@dataclass(frozen=True)
class Mode:
    name: str
    backbone: str
    batch_size: int
    max_length: int
    rank: int  # r0 of every method in the step-time and memory runs
    delta_t: int  # optimizer steps between allocation events; a group of delta_t steps holds one event
    block_steps: int  # interleaving unit in optimizer steps (divides delta_t)
    warm_steps: int  # untimed steps before the first timed one (a multiple of delta_t)
    groups: int  # timed groups of delta_t steps per run
    memory_steps: int  # optimizer steps of each memory run
    memory_repeats: int
    micro_rounds: int  # interleaved rounds of the allocator micro-benchmark
    micro_calls: int  # calls per benchmark per round


QUICK = Mode("quick", "tiny_deberta", batch_size=8, max_length=64, rank=8, delta_t=10, block_steps=5, warm_steps=20,
             groups=3, memory_steps=30, memory_repeats=1, micro_rounds=2, micro_calls=3)
FULL = Mode("full", "minilm", batch_size=16, max_length=64, rank=8, delta_t=10, block_steps=1, warm_steps=20,
            groups=10, memory_steps=30, memory_repeats=2, micro_rounds=9, micro_calls=5)
# the step-time runs: a second, identical lora run is the A/A control that shows the noise floor
STEP_RUNS = {"lora": "lora", "lora_control": "lora", "adalora": "adalora", "flexlora": "flexlora"}


# ---------------------------------------------------------------------------------------------- helpers
def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [float(q[0]), float(q[2])]


def _rotations(items: tuple[str, ...] | list[str], r: int) -> list[str]:
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


def _quiet() -> None:
    import lightning  # noqa: F401 - sets its loggers' levels on import; override them afterwards

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "flexlora", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def run_config(mode: Mode, method: str, out_dir: Path):
    """The Hydra config of one benchmark run: ``run.py``'s config with the bench's overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    dt, warm = mode.delta_t, mode.warm_steps
    total = warm + mode.groups * dt + 2 * dt
    overrides = [
        f"backbone={mode.backbone}", "task=tweets", f"task.batch_size={mode.batch_size}",
        f"task.max_length={mode.max_length}", f"task.max_train_samples={mode.batch_size * (total + 5)}",
        "task.max_eval_samples=32", "task.max_epochs=1", f"task.max_steps={total}",
        "logger=none", "callbacks=none", "trainer=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "+trainer.enable_checkpointing=false", "+trainer.limit_val_batches=0",
        "report.figures=false", f"allocator={method}", f"allocator.rank={mode.rank}",
        # events at t_init + k delta_t: the last warm-up step and the last step of every timed group; the
        # window (AdaLoRA's budget phase, FlexLoRA's event window) ends after the last timed step
        f"allocator.t_init={warm - dt}", f"allocator.t_final={dt}", f"allocator.delta_t={dt}",
        f"hydra.run.dir={out_dir}",
    ]
    if method == "adalora":
        overrides.append(f"allocator.target_rank={max(1, mode.rank // 2)}")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.pop("hydra")
        cfg.paths.output_dir = str(out_dir)
    return cfg


# ---------------------------------------------------------------------------------------------- 1. step time
def _gate_class():
    import lightning as L

    class Gate(L.Callback):
        """Parks a run at block boundaries (end of an optimizer step) until the scheduler releases it."""

        def __init__(self, warm: int, block: int, blocks: int, allocation: Any) -> None:
            self.warm, self.block, self.blocks, self.allocation = warm, block, blocks, allocation
            self.go, self.done = threading.Event(), threading.Event()
            self.wall: list[float] = []  # per timed block
            self.cpu: list[float] = []  # CPU time of the training thread
            self.faults: list[int] = []  # minor page faults of the training thread
            self.events: list[int] = []
            self.seq_lens: list[int] = []
            self._start: tuple[float, float, int] | None = None
            self._events_at_start = 0

        @staticmethod
        def _clock() -> tuple[float, float, int]:
            return time.perf_counter(), time.thread_time(), resource.getrusage(RUSAGE_THREAD).ru_minflt

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self._start is not None:
                self.seq_lens.append(int(batch["input_ids"].shape[1]))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step < self.warm or (step - self.warm) % self.block:
                return
            now = self._clock()
            if self._start is not None:
                self.wall.append(now[0] - self._start[0])
                self.cpu.append(now[1] - self._start[1])
                self.faults.append(now[2] - self._start[2])
                self.events.append(self.allocation.events - self._events_at_start)
            if len(self.wall) >= self.blocks:
                trainer.should_stop = True
                return
            self.done.set()
            self.go.wait()
            self.go.clear()
            self._events_at_start = self.allocation.events
            self._start = self._clock()

    return Gate


class _Run:
    """One allocator's real Trainer.fit, in a thread that the scheduler advances block by block."""

    def __init__(self, mode: Mode, name: str, method: str, out_dir: Path) -> None:
        from flexlora.train import build

        self.method = name
        cfg = run_config(mode, method, out_dir)
        self.datamodule, self.module, self.trainer, self.allocation = build(cfg)
        self.datamodule.setup("fit")
        blocks = mode.groups * mode.delta_t // mode.block_steps
        self.gate = _gate_class()(mode.warm_steps, mode.block_steps, blocks, self.allocation)
        self.trainer.callbacks.append(self.gate)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, name=f"bench-{name}", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        torch.set_num_threads(1)
        self.gate.go.wait()
        self.gate.go.clear()
        try:
            self.trainer.fit(self.module, datamodule=self.datamodule)
        except BaseException as err:  # reported by advance() in the main thread
            self.error = err
        finally:
            self.gate.done.set()

    def advance(self, timeout: float = 1800.0) -> None:
        self.gate.done.clear()
        self.gate.go.set()
        if not self.gate.done.wait(timeout):
            raise TimeoutError(f"{self.method}: a block did not finish within {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"{self.method} training failed: {self.error!r}") from self.error


def _groups(values: list[Any], per_group: int) -> list[Any]:
    return [sum(values[i : i + per_group]) for i in range(0, len(values), per_group)]


def bench_step_time(mode: Mode, work: Path) -> dict[str, Any]:
    if mode.delta_t % mode.block_steps or mode.warm_steps % mode.delta_t or mode.warm_steps < mode.delta_t:
        raise ValueError("block_steps must divide delta_t, and warm_steps be a positive multiple of delta_t")
    names = list(STEP_RUNS)
    runs = {n: _Run(mode, n, m, work / f"step-{n}") for n, m in STEP_RUNS.items()}
    for n in names:  # warm-up (fit start, first steps, one event), one run at a time
        runs[n].advance()
    gc.collect()
    gc.freeze()  # what exists now is never scanned again: no full collection lands in a timed block
    try:
        for r in range(mode.groups * mode.delta_t // mode.block_steps):
            for n in _rotations(names, r):
                runs[n].advance()
        for run in runs.values():
            run.thread.join(timeout=600)
    finally:
        gc.unfreeze()
    per_group = mode.delta_t // mode.block_steps
    wall = {n: _groups(runs[n].gate.wall, per_group) for n in names}
    cpu = {n: _groups(runs[n].gate.cpu, per_group) for n in names}
    out: dict[str, Any] = {
        "setup": {
            "backbone": mode.backbone, "task": "tweets", "batch_size": mode.batch_size,
            "max_length": mode.max_length, "mean_padded_seq_len": _median(
                [statistics.fmean(runs[n].gate.seq_lens) for n in names]),
            "rank_r0": mode.rank, "flexlora_max_rank": 2 * mode.rank, "adalora_target_rank": max(1, mode.rank // 2),
            "adapted_matrices": len(runs["lora"].module.adapters), "delta_t": mode.delta_t,
            "block_steps": mode.block_steps, "groups": mode.groups,
            "timed_steps_per_run": mode.groups * mode.delta_t, "warmup_steps": mode.warm_steps,
            "orth_reg": {n: runs[n].module.allocator_config.orth_reg for n in names},
            "driver": "lightning.Trainer.fit per run in a thread, parked at block boundaries (one runs at a time)",
        },
    }
    for n in names:
        steps = mode.delta_t
        entry: dict[str, Any] = {
            "ms_per_step_median": 1e3 * _median(wall[n]) / steps,
            "cpu_ms_per_step_median": 1e3 * _median(cpu[n]) / steps,
            "ms_per_step_groups": [round(1e3 * t / steps, 2) for t in wall[n]],
            "minor_faults_per_step": statistics.fmean(runs[n].gate.faults) / mode.block_steps,
            "events_per_group": _groups(runs[n].gate.events, per_group),
        }
        if n != "lora":
            ratios = [a / b for a, b in zip(wall[n], wall["lora"], strict=True)]
            cpu_ratios = [a / b for a, b in zip(cpu[n], cpu["lora"], strict=True)]
            entry.update(
                ratio_vs_lora=_median(ratios), ratio_vs_lora_iqr=_quartiles(ratios),
                ratio_vs_lora_total=sum(wall[n]) / sum(wall["lora"]),
                cpu_ratio_vs_lora=_median(cpu_ratios), cpu_ratio_vs_lora_iqr=_quartiles(cpu_ratios),
            )
        out[n] = entry
    out["components"] = step_components(mode, {m: runs[m] for m in METHODS}, out["lora"]["ms_per_step_median"])
    del runs
    gc.collect()
    return out


class _ZeroBase(torch.nn.Module):
    """Stands in for a frozen linear layer at no cost, so that only the adapter path of a layer is timed."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def step_components(mode: Mode, runs: dict[str, _Run], lora_ms_per_step: float) -> dict[str, Any]:
    """What each method adds to a training step, piece by piece, on the trained runs' own objects.

    End-to-end step ratios are limited by the machine's noise (see lora_control); the pieces are short
    calls whose medians are precise. Pieces: the adapter path of every adapted layer (forward + backward
    at the run's activation shapes, frozen base replaced by a zero-cost stand-in), SlotAdamW.step, the
    orthogonality penalty (forward + backward), the callback's per-step work (observe + plan at a step
    without an event) and one allocation event (plan + apply + surgery, divided by delta_t: one event per
    delta_t steps).
    """
    from torch import nn

    from flexlora.adapters import SlotLoRALayer, apply_plan, orthogonality_penalty
    from flexlora.optim import apply_surgery

    batch = next(iter(runs["lora"].datamodule.train_dataloader()))
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, inp[0].shape))
             for name, layer in runs["lora"].module.adapters.items()]
    for run in runs.values():  # fresh gradients everywhere (what observe and the optimizer consume)
        module = run.module
        module.train()
        module.zero_grad(set_to_none=True)
        loss = module.task_loss(module(batch), batch["labels"])
        config = module.allocator_config
        if config.orth_reg > 0:
            loss = loss + config.orth_reg * orthogonality_penalty(module.adapters.values(), config.orth_form)
        loss.backward()
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator) for shape in shapes.values()]

    def zero_base_copies(run: _Run) -> list[SlotLoRALayer]:
        copies = []
        for layer in run.module.adapters.values():
            copy = SlotLoRALayer(torch.nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features),
                                 form=layer.form, rank=layer.rank, max_rank=layer.max_rank, alpha=layer.alpha)
            copy.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("base.")},
                                 strict=False)
            copy.base = _ZeroBase(layer.out_features)
            copies.append(copy)
        return copies

    layers = {m: zero_base_copies(run) for m, run in runs.items()}
    grads_out = [torch.randn(*shape[:-1], layer.out_features, generator=generator)
                 for shape, layer in zip(shapes.values(), layers["lora"], strict=True)]

    def adapter_path(m: str) -> None:
        for layer, x, grad in zip(layers[m], inputs, grads_out, strict=True):
            x = x.detach().requires_grad_(True)
            layer(x).backward(grad)

    def optimizer_step(m: str) -> None:
        runs[m].trainer.optimizers[0].step()

    def penalty(m: str) -> None:
        config = runs[m].module.allocator_config
        if config.orth_reg > 0:
            (config.orth_reg * orthogonality_penalty(runs[m].module.adapters.values(), config.orth_form)).backward()

    allocators = {m: run.allocation.allocator for m, run in runs.items()}
    steps: dict[str, tuple[int, int]] = {}  # (step without an event, event step)
    for m, allocator in allocators.items():
        assert allocator is not None and allocator.total_steps is not None
        window = range(allocator.t_init + 1, allocator.total_steps - allocator.t_final)
        event = next((t for t in reversed(window) if (t - allocator.t_init) % mode.delta_t == 0), window[-1])
        steps[m] = (event - 1, event)

    def per_step_callback(m: str) -> None:
        adapters = runs[m].module.adapters
        allocators[m].observe(adapters, steps[m][0])
        assert allocators[m].plan(adapters, steps[m][0]) is None

    snapshots = {m: {n: (layer.mask.clone(), layer.lora_E.detach().clone() if layer.lora_E is not None else None)
                     for n, layer in run.module.adapters.items()} for m, run in runs.items()}

    def event(m: str) -> float:  # what on_train_batch_end adds at an event step (observe is per step)
        adapters, optimizer = runs[m].module.adapters, runs[m].trainer.optimizers[0]
        start = time.perf_counter()
        plan = allocators[m].plan(adapters, steps[m][1])
        if plan is not None and not plan.is_empty():
            touched = apply_plan(adapters, plan, runs[m].allocation.generator)
            apply_surgery(optimizer, adapters, touched)
        elapsed = time.perf_counter() - start
        with torch.no_grad():  # untimed: every call is the same event
            for name, (mask, lam) in snapshots[m].items():
                adapters[name].load_state_dict({**adapters[name].state_dict(), "mask": mask}, strict=False)
                if lam is not None:
                    adapters[name].lora_E.copy_(lam)
        return elapsed

    def timed(fn: Callable[[str], Any]) -> Callable[[str], float]:
        def call(m: str) -> float:
            start = time.perf_counter()
            fn(m)
            return time.perf_counter() - start
        return call

    pieces: dict[str, Callable[[str], float]] = {
        "adapter_path_fwd_bwd": timed(adapter_path), "optimizer_step": timed(optimizer_step),
        "orth_penalty_fwd_bwd": timed(penalty), "callback_per_step": timed(per_step_callback), "event": event,
    }
    for piece in pieces.values():  # warm-up
        for m in METHODS:
            piece(m)
    samples: dict[tuple[str, str], list[float]] = {(m, k): [] for m in METHODS for k in pieces}
    rounds = max(2, mode.micro_rounds)
    for r in range(rounds):
        for key, piece in pieces.items():
            for m in _rotations(METHODS, r):
                samples[(m, key)].extend(piece(m) for _ in range(mode.micro_calls))
    ms = {m: {k: 1e3 * _median(samples[(m, k)]) for k in pieces} for m in METHODS}
    out: dict[str, Any] = {
        "what": "ms per call, medians; event_per_step = event / delta_t; extra = method minus lora",
        "lora_ms_per_step": lora_ms_per_step, "rounds": rounds, "calls_per_round": mode.micro_calls,
    }
    for m in METHODS:
        per_step = dict(ms[m])
        event_ms = per_step.pop("event")
        event_ms = event_ms if allocators[m].dynamic else 0.0
        per_step["event_per_step"] = event_ms / mode.delta_t
        out[m] = {"ms": per_step, "event_ms": event_ms}
    for m in ("adalora", "flexlora"):
        extra = {k: out[m]["ms"][k] - out["lora"]["ms"][k] for k in out[m]["ms"]}
        out[m]["extra_vs_lora_ms"] = extra
        out[m]["extra_vs_lora_ms_total"] = sum(extra.values())
        out[m]["predicted_ratio_vs_lora"] = 1 + sum(extra.values()) / lora_ms_per_step
        no_adapter = sum(v for k, v in extra.items() if k != "adapter_path_fwd_bwd")
        out[m]["predicted_ratio_vs_lora_without_adapter_path"] = 1 + no_adapter / lora_ms_per_step
    return out


# ---------------------------------------------------------------------------------------------- 2. allocator cost
DEBERTA_BASE_LAYER = [  # (module path inside a layer, in_features, out_features)
    ("attention.self.query_proj", 768, 768), ("attention.self.key_proj", 768, 768),
    ("attention.self.value_proj", 768, 768), ("attention.output.dense", 768, 768),
    ("intermediate.dense", 768, 3072), ("output.dense", 3072, 768),
]
DEBERTA_BASE_LAYERS = 12


def _allocator_yaml(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "allocator" / f"{name}.yaml"), resolve=True))


def _deberta_adapters(form: str, rank: int, max_rank: int, bases: dict[str, torch.nn.Module], seed: int):
    from flexlora.adapters import SlotLoRALayer

    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, base in bases.items():
        layer = SlotLoRALayer(base, form=form, rank=rank, max_rank=max_rank, generator=generator)  # type: ignore[arg-type]
        with torch.no_grad():
            layer.lora_E.normal_(generator=generator).mul_(layer.mask)  # trained-looking, distinct values
        for param, _ in layer.slot_params():
            param.grad = torch.randn(param.shape, generator=generator) * 1e-3
        adapters[name] = layer
    return adapters


def _peft_shaped(adapters) -> torch.nn.Module:
    """A module whose parameters peft's RankAllocator sees as AdaLoRA's (``...lora_A.default`` etc.),
    holding the same values and gradients as ``adapters`` (lora_E as peft's (r, 1))."""
    from torch import nn

    root = nn.Module()
    for name, layer in adapters.items():
        holder = nn.Module()
        for pname in ("lora_A", "lora_E", "lora_B"):
            ours = getattr(layer, pname)
            shape = (ours.shape[0], 1) if pname == "lora_E" else tuple(ours.shape)
            param = nn.Parameter(ours.detach().clone().view(shape))
            param.grad = ours.grad.clone().view(shape)
            setattr(holder, pname, nn.ParameterDict({"default": param}))
        parent = root
        parts = f"base_model.model.deberta.encoder.layer.{name}".split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], holder)
    return root


def bench_allocator_cost(mode: Mode) -> dict[str, Any]:
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator
    from torch import nn

    from flexlora.adapters import apply_plan
    from flexlora.allocators import build_allocator
    from flexlora.optim import SlotAdamW, apply_surgery

    total_steps = 1000
    # frozen bases are never run: uninitialised memory is never touched, so it costs no time or RSS
    bases = {f"{layer}.{path}": torch.nn.utils.skip_init(nn.Linear, d_in, d_out)
             for layer in range(DEBERTA_BASE_LAYERS) for path, d_in, d_out in DEBERTA_BASE_LAYER}

    # FlexLoRA as conf/allocator/flexlora.yaml: r0 8, 16 slots, 4 matrices shrunk and 4 grown per event
    flex_cfg = _allocator_yaml("flexlora")
    flex_cfg.update(t_init=0, t_final=0)
    flex = build_allocator(flex_cfg)
    flex_ad = _deberta_adapters("svd", flex.config.rank, flex.config.max_rank, bases, seed=1)
    flex.bind(flex_ad, total_steps)
    flex_opt = SlotAdamW([p for layer in flex_ad.values() for p, _ in layer.slot_params()])
    flex_opt.step()  # surgery has moments and per-slot step counts to reset
    flex_gen = torch.Generator().manual_seed(7919)
    flex_step = flex.event_steps()[len(flex.event_steps()) // 2]
    snapshot = {n: (layer.mask.clone(), layer.lora_E.detach().clone()) for n, layer in flex_ad.items()}

    # AdaLoRA as conf/allocator/adalora.yaml: r0 12 -> target 8, t_init 0.1 T, t_final 0.2 T, delta_t 10
    ada_cfg = _allocator_yaml("adalora")
    ada = build_allocator(ada_cfg)
    ada_ad = _deberta_adapters("svd", ada.config.rank, ada.config.rank, bases, seed=2)
    ada.bind(ada_ad, total_steps)
    mask_step = next(t for t in range(ada.t_init + 1, total_steps) if ada.budget(t)[1]
                     and ada.budget(t)[0] < ada.initial_budget and t >= (ada.t_init + ada.final_step) // 2)
    normal_step = mask_step + 1
    assert not ada.budget(normal_step)[1]

    peft_model = _peft_shaped(ada_ad)
    peft_config = AdaLoraConfig(
        init_r=ada.config.rank, target_r=ada.config.target_rank, tinit=ada.t_init, tfinal=ada.t_final,
        deltaT=ada.config.delta_t, total_step=total_steps, beta1=ada.config.beta1, beta2=ada.config.beta2,
        target_modules=["query_proj"],
    )
    peft = RankAllocator(peft_model, peft_config, "default")
    assert peft.init_bgt == ada.initial_budget and peft.budget_schedule(mask_step) == ada.budget(mask_step)

    clock = time.perf_counter

    def flex_event() -> dict[str, float]:
        t0 = clock()
        plan = flex.plan(flex_ad, flex_step)
        t1 = clock()
        touched = apply_plan(flex_ad, plan, flex_gen)
        t2 = clock()
        apply_surgery(flex_opt, flex_ad, touched)
        t3 = clock()
        with torch.no_grad():  # untimed: restore so that every call is the same event
            for name, (mask, lam) in snapshot.items():
                flex_ad[name].load_state_dict({**flex_ad[name].state_dict(), "mask": mask}, strict=False)
                flex_ad[name].lora_E.copy_(lam)
        return {"total": t3 - t0, "plan": t1 - t0, "apply": t2 - t1, "surgery": t3 - t2}

    def ada_observe() -> dict[str, float]:
        t0 = clock()
        ada.observe(ada_ad, normal_step)
        plan = ada.plan(ada_ad, normal_step)
        t1 = clock()
        assert plan is None
        return {"total": t1 - t0}

    def ada_masking() -> dict[str, float]:
        t0 = clock()
        ada.observe(ada_ad, mask_step)
        t1 = clock()
        plan = ada.plan(ada_ad, mask_step)
        t2 = clock()
        touched = apply_plan(ada_ad, plan, None)
        apply_surgery(flex_opt, {}, touched)  # soft masking touches no optimizer state (touched is empty)
        t3 = clock()
        return {"total": t3 - t0, "observe": t1 - t0, "plan": t2 - t1, "apply": t3 - t2}

    def peft_normal() -> dict[str, float]:
        t0 = clock()
        _, pattern = peft.update_and_allocate(peft_model, normal_step)
        t1 = clock()
        assert pattern is None
        return {"total": t1 - t0}

    def peft_masking() -> dict[str, float]:
        t0 = clock()
        _, pattern = peft.update_and_allocate(peft_model, mask_step)
        t1 = clock()
        assert pattern is not None
        return {"total": t1 - t0}

    benches: dict[str, Callable[[], dict[str, float]]] = {
        "flexlora_event": flex_event, "adalora_scoring": ada_observe, "peft_scoring": peft_normal,
        "adalora_masking_step": ada_masking, "peft_masking_step": peft_masking,
    }
    for fn in benches.values():  # warm-up: lazily created EMA state, allocator caches
        fn()
        fn()
    calls: dict[str, list[dict[str, float]]] = {k: [] for k in benches}
    round_median: dict[str, list[float]] = {k: [] for k in benches}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(mode.micro_rounds):
            for key in _rotations(list(benches), r):
                times = []
                for _ in range(mode.micro_calls):
                    cpu0 = time.thread_time()
                    entry = benches[key]()
                    entry["cpu_total"] = time.thread_time() - cpu0  # includes the untimed restore, ~0.1 ms
                    times.append(entry)
                calls[key].extend(times)
                round_median[key].append(_median([t["total"] for t in times]))
    finally:
        if gc_was_enabled:
            gc.enable()

    out: dict[str, Any] = {
        "setup": {
            "shapes": "DeBERTa-v3-base: 12 layers x (q, k, v, attn-out 768x768; FFN-in 768->3072; FFN-out 3072->768)",
            "matrices": len(bases), "flexlora": {"rank": flex.config.rank, "max_rank": flex.config.max_rank,
                                                 "budget_per_event": flex.config.budget_per_event, "step": flex_step},
            "adalora": {"rank": ada.config.rank, "target_rank": ada.config.target_rank, "T": total_steps,
                        "t_init": ada.t_init, "t_final": ada.t_final, "delta_t": ada.config.delta_t,
                        "scoring_step": normal_step, "masking_step": mask_step,
                        "budget_at_masking_step": ada.budget(mask_step)[0], "initial_budget": ada.initial_budget},
            "rounds": mode.micro_rounds, "calls_per_round": mode.micro_calls,
            "peft": "peft.tuners.adalora.layer.RankAllocator.update_and_allocate on a module with peft's "
                    "parameter names, same values and gradients",
        },
    }
    for key in benches:
        parts = calls[key][0].keys()
        entry: dict[str, Any] = {"ms_median": 1e3 * _median([c["total"] for c in calls[key]]),
                                 "cpu_ms_median": 1e3 * _median([c["cpu_total"] for c in calls[key]])}
        breakdown = {p: 1e3 * _median([c[p] for c in calls[key]]) for p in parts if p not in ("total", "cpu_total")}
        if breakdown:
            entry["breakdown_ms"] = breakdown
        out[key] = entry
    for ours, ref in (("adalora_scoring", "peft_scoring"), ("adalora_masking_step", "peft_masking_step")):
        ratios = [a / b for a, b in zip(round_median[ours], round_median[ref], strict=True)]
        out[ours]["ratio_vs_peft"] = _median(ratios)
        out[ours]["ratio_vs_peft_iqr"] = _quartiles(ratios)
    return out


# ---------------------------------------------------------------------------------------------- 3. memory
def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def memory_run(mode: Mode, method: str, out_dir: Path) -> dict[str, Any]:
    """One allocator's short training run; meant to run in a process of its own."""
    import lightning as L

    from flexlora.train import build

    _quiet()
    steps = mode.memory_steps

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step >= steps:
                trainer.should_stop = True

    cfg = run_config(mode, method, out_dir)
    datamodule, module, trainer, allocation = build(cfg)
    datamodule.setup("fit")
    trainer.callbacks.append(StopAt())
    gc.collect()
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    trainer.fit(module, datamodule=datamodule)
    peak = _status_kb("VmHWM")
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = trainer.optimizers[0]
    tracker = getattr(allocation.allocator, "tracker", None)
    state = {
        "trainable_params": _tensor_bytes(trainable),
        "gradients": _tensor_bytes(p.grad for p in trainable if p.grad is not None),
        "optimizer_state": _tensor_bytes(t for s in optimizer.state.values() for t in s.values()),
        "allocator_state": 0 if tracker is None else _tensor_bytes(
            list(tracker.ipt_avg.values()) + list(tracker.unc_avg.values())),
    }
    return {
        "steps": trainer.global_step, "events": allocation.events, "peak_reset_before_fit": reset,
        "rss_before_fit_kb": rss_before, "peak_rss_fit_kb": peak, "fit_increment_kb": peak - rss_before,
        "training_state_bytes": sum(state.values()), "training_state_breakdown": state,
    }


def _in_fork(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked child (this process's imports, nothing else of its state) and
    return its JSON-able result."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            payload = json.dumps(fn(*args))
        except BaseException:
            payload = json.dumps({"error": traceback.format_exc()})
            code = 1
        with os.fdopen(write_fd, "w") as handle:
            handle.write(payload)
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as handle:
        data = handle.read()
    os.waitpid(pid, 0)
    result = json.loads(data) if data else {"error": "the child process died without a result"}
    if "error" in result:
        raise RuntimeError(f"memory run failed in its child process:\n{result['error']}")
    return result


def bench_memory(mode: Mode, work: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for r in range(mode.memory_repeats):
        for m in _rotations(METHODS, r):
            runs[m].append(_in_fork(memory_run, mode, m, work / f"mem-{m}-{r}"))
    out: dict[str, Any] = {
        "setup": {
            "what": "VmHWM (peak resident set size) of a forked process while it runs trainer.fit, reset right "
                    "before fit; the process has already imported the stack, built the model and tokenised the data",
            "steps_per_run": runs["lora"][0]["steps"], "repeats": mode.memory_repeats,
            "peak_reset_supported": all(r["peak_reset_before_fit"] for rs in runs.values() for r in rs),
        },
    }
    for m in METHODS:
        entry = {
            "peak_rss_fit_mb": _median([r["peak_rss_fit_kb"] for r in runs[m]]) / 1024,
            "rss_before_fit_mb": _median([r["rss_before_fit_kb"] for r in runs[m]]) / 1024,
            "fit_increment_mb": _median([r["fit_increment_kb"] for r in runs[m]]) / 1024,
            "training_state_mb": runs[m][0]["training_state_bytes"] / 2**20,
            "training_state_breakdown_mb": {k: v / 2**20 for k, v in runs[m][0]["training_state_breakdown"].items()},
            "events": runs[m][0]["events"],
        }
        out[m] = entry
    for m in METHODS:
        if m == "lora":
            continue
        for key in ("peak_rss_fit_mb", "fit_increment_mb", "training_state_mb"):
            base = out["lora"][key]
            out[m][key.replace("_mb", "_vs_lora")] = out[m][key] / base if base > 0 else float("nan")
    return out


# ---------------------------------------------------------------------------------------------- report
def evaluate_targets(results: dict[str, Any]) -> dict[str, Any]:
    """PASS when the measured value is within the limit. For the step-time ratios the end-to-end ratio and
    the ratio predicted from the step components must both be within it: the end-to-end ratio alone is no
    more precise than the lora_control ratio's distance from 1."""
    values: dict[str, float] = {}
    extra: dict[str, dict[str, Any]] = {}
    step = results.get("step_time")
    if step:
        for m in ("flexlora", "adalora"):
            key = f"{m}_step_vs_lora"
            values[key] = step[m]["ratio_vs_lora"]
            extra[key] = {"noise_floor_lora_control": step["lora_control"]["ratio_vs_lora"]}
            if "components" in step:
                extra[key]["predicted_from_components"] = step["components"][m]["predicted_ratio_vs_lora"]
    cost = results.get("allocator_cost")
    if cost:
        # judged on the calling thread's CPU time: the calls are single-threaded, and on a machine shared with
        # other work wall time also counts the time the thread waited for a core (wall ms are reported beside)
        for target, call in (("adalora_scoring_ms", "adalora_scoring"), ("adalora_masking_step_ms",
                             "adalora_masking_step"), ("flexlora_event_ms", "flexlora_event")):
            values[target] = cost[call].get("cpu_ms_median", cost[call]["ms_median"])
            extra[target] = {"wall_ms": cost[call]["ms_median"]}
    memory = results.get("memory")
    if memory:
        values["flexlora_peak_rss_vs_lora"] = memory["flexlora"]["peak_rss_fit_vs_lora"]
        values["adalora_peak_rss_vs_lora"] = memory["adalora"]["peak_rss_fit_vs_lora"]
    targets = {}
    for key, value in values.items():
        limit, unit = TARGETS[key]
        entry: dict[str, Any] = {"value": value, "limit": limit, "unit": unit, **extra.get(key, {})}
        checked = [value] + ([entry["predicted_from_components"]] if "predicted_from_components" in entry else [])
        entry["pass"] = bool(all(v <= limit for v in checked))
        targets[key] = entry
    return targets


def markdown_tables(results: dict[str, Any]) -> str:
    lines: list[str] = []
    step = results.get("step_time")
    if step:
        lines += ["| run | ms / step | wall ratio vs lora (IQR) | CPU ms / step | CPU ratio vs lora (IQR) | "
                  "page faults / step | events / group |", "|---|---:|---|---:|---|---:|---|"]

        def ratio(entry: dict[str, Any], key: str) -> str:
            if key not in entry:
                return "1"
            return "{:.3f} ({:.3f} - {:.3f})".format(entry[key], *entry[f"{key}_iqr"])

        for n in STEP_RUNS:
            e = step[n]
            lines.append(f"| {n} | {e['ms_per_step_median']:.1f} | {ratio(e, 'ratio_vs_lora')} | "
                         f"{e['cpu_ms_per_step_median']:.1f} | {ratio(e, 'cpu_ratio_vs_lora')} | "
                         f"{e['minor_faults_per_step']:.0f} | {sorted(set(e['events_per_group']))} |")
        lines.append("")
        comp = step.get("components")
        if comp:
            keys = list(comp["lora"]["ms"])
            lines += ["| ms per step | " + " | ".join(keys) + " | extra vs lora | predicted ratio |",
                      "|---|" + "---:|" * (len(keys) + 2)]
            for m in METHODS:
                c = comp[m]
                extra = f"{c['extra_vs_lora_ms_total']:+.1f}" if "extra_vs_lora_ms_total" in c else "-"
                pred = f"{c['predicted_ratio_vs_lora']:.3f}" if "predicted_ratio_vs_lora" in c else "1"
                lines.append(f"| {m} | " + " | ".join(f"{c['ms'][k]:.2f}" for k in keys) + f" | {extra} | {pred} |")
            lines.append("")
    cost = results.get("allocator_cost")
    if cost:
        lines += ["| call (72 DeBERTa-v3-base matrices) | ms (median) | CPU ms (median) | ratio vs peft | "
                  "breakdown (ms) |", "|---|---:|---:|---:|---|"]
        for key in ("flexlora_event", "adalora_scoring", "peft_scoring", "adalora_masking_step", "peft_masking_step"):
            e = cost[key]
            ratio = f"{e['ratio_vs_peft']:.2f}" if "ratio_vs_peft" in e else "-"
            parts = ", ".join(f"{k} {v:.2f}" for k, v in e.get("breakdown_ms", {}).items()) or "-"
            cpu = f"{e['cpu_ms_median']:.2f}" if "cpu_ms_median" in e else "-"
            lines.append(f"| {key} | {e['ms_median']:.2f} | {cpu} | {ratio} | {parts} |")
        lines.append("")
    memory = results.get("memory")
    if memory:
        lines += ["| method | peak RSS in fit (MB) | vs lora | fit increment (MB) | vs lora | "
                  "training state (MB) | vs lora |", "|---|---:|---:|---:|---:|---:|---:|"]
        for m in METHODS:
            e = memory[m]

            def vs(key: str, entry: dict[str, Any] = e) -> str:
                return f"{entry[key]:.3f}" if key in entry else "1"

            lines.append(f"| {m} | {e['peak_rss_fit_mb']:.1f} | {vs('peak_rss_fit_vs_lora')} | "
                         f"{e['fit_increment_mb']:.1f} | {vs('fit_increment_vs_lora')} | "
                         f"{e['training_state_mb']:.2f} | {vs('training_state_vs_lora')} |")
        lines.append("")
    targets = results.get("targets")
    if targets:
        lines += ["| target | measured | limit | |", "|---|---:|---:|---|"]
        for k, t in targets.items():
            measured = f"{t['value']:.3f} {t['unit']}"
            if "wall_ms" in t:
                measured = f"{t['value']:.2f} CPU ms (wall {t['wall_ms']:.2f} ms)"
            if "predicted_from_components" in t:
                measured += (f" (components: {t['predicted_from_components']:.3f}; "
                             f"lora_control: {t['noise_floor_lora_control']:.3f})")
            lines.append(f"| {k} | {measured} | <= {t['limit']} {t['unit']} | {'PASS' if t['pass'] else 'MISS'} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(), "loadavg_at_start": load,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny_deberta, few repeats (seconds; for the tests)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results JSON (default: {DEFAULT_OUT.relative_to(REPO)} in full mode, a temp file "
                             "with --quick)")
    parser.add_argument("--parts", default="memory,step,alloc",
                        help="comma-separated subset of memory,step,alloc (default: all)")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"memory", "step", "alloc"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="flexlora-bench-")) / "results.json" if args.quick else DEFAULT_OUT
    _quiet()

    started = time.time()
    results: dict[str, Any] = {"meta": {"mode": mode.name, "settings": asdict(mode), "machine": machine(),
                                        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}}
    with tempfile.TemporaryDirectory(prefix="flexlora-bench-work-") as tmp:
        work = Path(tmp)
        # memory first: the forked children must start from a process that holds nothing but imports
        if "memory" in parts:
            print(f"[bench] memory: {len(METHODS)} x {mode.memory_repeats} forked runs on {mode.backbone}", flush=True)
            results["memory"] = bench_memory(mode, work)
        if "step" in parts:
            print(f"[bench] step time: {len(STEP_RUNS)} runs x {mode.groups * mode.delta_t} interleaved steps "
                  f"on {mode.backbone}", flush=True)
            results["step_time"] = bench_step_time(mode, work)
        if "alloc" in parts:
            print("[bench] allocator cost: 72 DeBERTa-v3-base matrices, ours vs peft", flush=True)
            results["allocator_cost"] = bench_allocator_cost(mode)
    results["targets"] = evaluate_targets(results)
    results["meta"]["wall_time_s"] = round(time.time() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_tables(results))
    print(f"[bench] wrote {out} ({results['meta']['wall_time_s']} s)")
    return results


if __name__ == "__main__":
    main()
