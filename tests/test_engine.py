"""The loop-free engine: the README's plain PyTorch loop runs as written, and a resumed engine continues exactly."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from flexlora import FlexLoRAConfig, RankAllocationEngine, SlotAdamW, inject, param_groups

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_loop() -> str:
    section = README.read_text().split("## Use it in your own loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_plain_loop_runs_and_allocates(capsys):
    namespace: dict = {}
    exec(compile(readme_loop(), "README.md", "exec"), namespace)
    engine = namespace["engine"]
    assert engine.events == 5  # t_init < t < T - t_final with (t - t_init) % delta_t == 0: t = 15, 20, ..., 35
    ranks = engine.rank_pattern()
    assert sum(ranks.values()) == 4 * len(ranks)  # the budget: n * r0, always
    assert len(set(ranks.values())) > 1, "FlexLoRA should have moved rank between matrices"
    kinds = [r["kind"] for r in engine.event_log.records]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("event") == engine.events


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100, num_labels=2))
    config = FlexLoRAConfig(rank=4, alpha=8.0, orth_reg=0.1, t_init=4, t_final=4, delta_t=2, budget_per_event=1)
    adapters = inject(model, ["query", "value"], head_modules=["classifier"], **config.adapter_kwargs())
    engine = RankAllocationEngine(adapters, config, seed=seed)
    optimizer = SlotAdamW(param_groups(model.named_parameters(), adapters), lr=1e-2)
    engine.bind(optimizer, total_steps=24)
    return model, engine, optimizer


def _train(model, engine, optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 100, (4, 8), generator=g)
        loss = model(input_ids=ids, labels=ids[:, 0] % 2).loss + engine.penalty()
        loss.backward()
        optimizer.step()
        engine.step(step)
        optimizer.zero_grad()


def test_engine_state_round_trip_resumes_bit_identically():
    model, engine, optimizer = _setup()
    engine.start()
    _train(model, engine, optimizer, range(1, 25))

    model2, engine2, optimizer2 = _setup()
    engine2.start()
    _train(model2, engine2, optimizer2, range(1, 11))
    saved = (model2.state_dict(), optimizer2.state_dict(), engine2.state_dict())
    model3, engine3, optimizer3 = _setup(seed=0)
    model3.load_state_dict(saved[0])
    engine3.load_state_dict(saved[2])  # restores the slot masks' allocator state, generator and log
    optimizer3.load_state_dict(saved[1])
    _train(model3, engine3, optimizer3, range(11, 25))

    assert engine3.events == engine.events > 0
    assert engine3.rank_pattern() == engine.rank_pattern()
    assert [r["ranks"] for r in engine3.event_log.events()] == [r["ranks"] for r in engine.event_log.events()]
    for (name, a), b in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_dynamic_allocator_refuses_an_optimizer_without_slot_surgery():
    import pytest

    from flexlora.errors import FlexLoRAError

    model, engine, _ = _setup()
    adapters = engine.adapters
    with pytest.raises(FlexLoRAError, match=r"per-slot step counts.*SlotAdamW"):
        engine.bind(torch.optim.AdamW(model.parameters(), lr=1e-3), total_steps=20)

    class DeclaresSlotSurgery(SlotAdamW):  # any optimizer may declare it; SlotAdamW does
        slot_surgery = True

    engine.bind(DeclaresSlotSurgery(param_groups(model.named_parameters(), adapters), lr=1e-3), total_steps=20)
