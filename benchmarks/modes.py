"""What each mode runs: the runs of every part, their sizes and repeat counts (one place to read them)."""

from __future__ import annotations

from dataclasses import dataclass

from flexlora.allocators.config import METHODS

# the registry's names; a renamed method fails here, at import, not halfway through a benchmark
LORA, ADALORA, FLEXLORA = (METHODS[name].name for name in ("lora", "adalora", "flexlora"))


@dataclass(frozen=True)
class RunSpec:
    """One training run of a step-time or memory part: a results key, its allocator, its slot capacity."""

    name: str
    method: str
    capacity: int | None = None  # allocator.max_rank as a multiple of r0; None: the allocator config's default


# lora_control is a second, identical lora run: the A/A control that shows the noise floor of a ratio.
# flexlora keeps the config's default capacity (today 2 x r0); flexlora_2x / _4x pin it explicitly.
BASE_RUNS = (RunSpec(LORA, LORA), RunSpec(f"{LORA}_control", LORA), RunSpec(ADALORA, ADALORA),
             RunSpec(FLEXLORA, FLEXLORA))
CAPACITY_RUNS = (RunSpec(f"{FLEXLORA}_2x", FLEXLORA, 2), RunSpec(f"{FLEXLORA}_4x", FLEXLORA, 4))
MEMORY_RUNS = (RunSpec(LORA, LORA), RunSpec(ADALORA, ADALORA), RunSpec(FLEXLORA, FLEXLORA), CAPACITY_RUNS[1])


@dataclass(frozen=True)
class StepSetup:
    """One interleaved step-time comparison: backbone, task, batch, event schedule and timed window."""

    backbone: str
    task: str  # tweets (sequence classification) or commonsense (causal LM)
    batch_size: int
    seq_len: int  # tweets: task.max_length; commonsense: task.cutoff_len
    rank: int  # r0 of every run
    delta_t: int  # optimizer steps between events; a group of delta_t timed steps holds one event
    block_steps: int  # interleaving unit in optimizer steps (divides delta_t)
    warm_steps: int  # untimed steps before the first timed one (a positive multiple of delta_t)
    groups: int  # timed groups of delta_t steps per run
    runs: tuple[RunSpec, ...]
    components: bool  # also time what each method adds per step, piece by piece

    @property
    def total_steps(self) -> int:
        """T: the timed window ends 2 delta_t before T, so every timed group is inside the event window."""
        return self.warm_steps + (self.groups + 2) * self.delta_t

    @property
    def timed_steps(self) -> int:
        return self.groups * self.delta_t

    def check(self) -> None:
        if self.delta_t % self.block_steps or self.warm_steps % self.delta_t or self.warm_steps < self.delta_t:
            raise ValueError("block_steps must divide delta_t, and warm_steps be a positive multiple of delta_t")


@dataclass(frozen=True)
class Mode:
    name: str
    step: StepSetup  # MiniLM (full) / tiny_deberta (quick) on tweets
    causal: StepSetup  # SmolLM2-135M (full) / tiny_llama (quick) on commonsense
    memory_steps: int  # optimizer steps of each forked memory run
    memory_repeats: int
    micro_rounds: int  # interleaved rounds of the allocator-call benchmarks
    micro_calls: int  # timed calls per benchmark per round
    component_rounds: int  # interleaved rounds of the step components
    component_calls: int
    llama_layers: int  # decoder layers of the LLaMA-3-8B-shaped event (32 in the real model)
    judge: bool  # PASS/MISS against the targets (never for quick numbers)


FULL = Mode(
    "full",
    step=StepSetup("minilm", "tweets", batch_size=16, seq_len=64, rank=8, delta_t=10, block_steps=1, warm_steps=20,
                   groups=10, runs=BASE_RUNS + CAPACITY_RUNS, components=True),
    # a SmolLM2 step is 1 - 2 s on one CPU thread: 4 runs x 35 steps (+ 4 model loads) stay under 8 minutes
    causal=StepSetup("smollm2_135m", "commonsense", batch_size=4, seq_len=128, rank=8, delta_t=5, block_steps=1,
                     warm_steps=5, groups=6, runs=BASE_RUNS, components=False),
    memory_steps=30, memory_repeats=2, micro_rounds=9, micro_calls=5, component_rounds=9, component_calls=3,
    llama_layers=32, judge=True,
)
QUICK = Mode(
    "quick",
    step=StepSetup("tiny_deberta", "tweets", batch_size=8, seq_len=64, rank=8, delta_t=10, block_steps=5,
                   warm_steps=10, groups=2, runs=BASE_RUNS + CAPACITY_RUNS, components=True),
    causal=StepSetup("tiny_llama", "commonsense", batch_size=4, seq_len=128, rank=8, delta_t=5, block_steps=5,
                     warm_steps=5, groups=2, runs=BASE_RUNS, components=False),
    memory_steps=30, memory_repeats=1, micro_rounds=2, micro_calls=3, component_rounds=2, component_calls=2,
    llama_layers=4, judge=False,
)
