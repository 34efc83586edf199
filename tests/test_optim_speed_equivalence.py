"""SlotAdamW's multi-tensor step and the orthogonality penalty against the per-tensor arithmetic they replace.

The oracles below are copies of the former implementations, kept here only as the reference: every
comparison is ``torch.equal`` (bit for bit), parameters, optimizer state and gradients alike. The penalty
cases are chosen to catch a batched rewrite that rounds differently: MKL's batched sgemm (``bmm`` into a
contiguous output) differs from one sgemm per matrix for some odd ranks, and a small sgemm's result can
depend on its operands' addresses modulo 64 bytes (a gram's gradient sits j r^2 elements into the stack's).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flexlora.adapters import SlotLoRALayer, orthogonality_penalty
from flexlora.adapters.layer import slot_axis
from flexlora.optim import SlotAdamW, reset_slots
from flexlora.optim.slot_adamw import _step_one


# ------------------------------------------------------------------------------------------------ oracles
class OracleSlotAdamW(SlotAdamW):
    """SlotAdamW's step one tensor at a time: torch AdamW's formulas with a step size and a bias correction
    per slot (``param + (-size * exp_avg) / denom``, the rounding of torch's ``addcdiv_`` with a scalar)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param] if self.state[param] else self._init_state(param)
                axis = slot_axis(param)
                grad, steps, exp_avg, exp_avg_sq = param.grad, state["step"], state["exp_avg"], state["exp_avg_sq"]
                if axis is None:
                    steps += 1
                    param.mul_(1 - lr * wd)
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    t = steps.item()
                    denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
                    param.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**t)))
                    continue
                dim, live = axis.dim, axis.live.count
                if live == 0:
                    continue
                param, grad = param.narrow(dim, 0, live), grad.narrow(dim, 0, live)
                exp_avg, exp_avg_sq, steps = exp_avg.narrow(dim, 0, live), exp_avg_sq.narrow(dim, 0, live), steps[:live]
                steps += 1
                param.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                shape = [1] * param.dim()
                shape[dim] = -1
                counts = steps.tolist()  # torch AdamW's factors, in Python floats, per slot
                step_size = torch.tensor([-(lr / (1 - beta1**t)) for t in counts], dtype=torch.float64)
                bias_correction2_sqrt = torch.tensor([(1 - beta2**t) ** 0.5 for t in counts], dtype=torch.float64)
                step_size = step_size.to(param.dtype).view(shape)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.to(param.dtype).view(shape)).add_(eps)
                param.addcdiv_(exp_avg * step_size, denom)
        return loss


def oracle_penalty(layers, form="code"):
    """The former orthogonality_penalty: grams one small matmul at a time, stacked per live rank."""
    groups = {}
    for layer in layers:
        groups.setdefault(layer.live_rank, []).append(layer)
    terms, empty = [], 0
    for rank, members in groups.items():
        if rank == 0:
            empty += 2 * len(members)
            continue
        grams = []
        for layer in members:
            a, b = layer.lora_A[:rank], layer.lora_B[:, :rank]
            grams += [a @ a.t(), b.t() @ b]
        residual = torch.stack(grams) - torch.eye(rank, dtype=grams[0].dtype, device=grams[0].device)
        terms.append(torch.linalg.matrix_norm(residual, ord="fro") if form == "code" else residual.pow(2).sum((1, 2)))
    if not terms:
        return layers[0].lora_A.sum() * 0.0
    values = torch.cat(terms)
    return values.sum() if form == "paper" else values.sum() / (values.numel() + empty)


# ------------------------------------------------------------------------------------------------ SlotAdamW
def slot_model(seed: int = 0) -> nn.ModuleDict:
    """Slot layers of several live counts, forms, capacities and dtypes, plus an untagged head."""
    torch.manual_seed(seed)  # the frozen bases and the head
    generator = torch.Generator().manual_seed(seed)

    def layer(d_in, d_out, form="svd", rank=4, max_rank=8, init_rank=None, dtype=torch.float32):
        return SlotLoRALayer(
            nn.Linear(d_in, d_out, dtype=dtype),
            form=form,
            rank=rank,
            max_rank=max_rank,
            init_rank=init_rank,
            generator=generator,
        )

    return nn.ModuleDict(
        {
            "q": layer(24, 24),
            "k": layer(24, 24, init_rank=2),
            "ffn": layer(24, 40, init_rank=7),
            "lora": layer(24, 24, form="lora", init_rank=5),
            "wide": layer(24, 40, rank=20, max_rank=32),
            "empty": layer(24, 24, init_rank=0),
            "f64": layer(16, 12, dtype=torch.float64, init_rank=3),
            "bf16": layer(16, 12, dtype=torch.bfloat16),
            "head": nn.Linear(24, 2),
        }
    )


def optimizers(seed: int, wd: float) -> tuple[nn.ModuleDict, SlotAdamW, nn.ModuleDict, OracleSlotAdamW]:
    """Two identical models, SlotAdamW on one and the oracle on the other; two param groups with different lr
    (and decay)."""
    model, twin = slot_model(seed), slot_model(seed)

    def groups(m):
        adapters = [p for name, mod in m.items() if name != "head" for p in mod.parameters() if p.requires_grad]
        adapters = [p for p in adapters if slot_axis(p) is not None]
        return [
            {"params": adapters[::2], "lr": 3e-2},
            {"params": adapters[1::2] + list(m["head"].parameters()), "lr": 1e-2, "weight_decay": wd / 2},
        ]

    return model, SlotAdamW(groups(model), weight_decay=wd), twin, OracleSlotAdamW(groups(twin), weight_decay=wd)


def set_grads(model: nn.ModuleDict, twin: nn.ModuleDict, generator: torch.Generator, skip: str = "") -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if not p.requires_grad:
            continue
        g = None if skip and name.startswith(skip) else torch.randn(p.shape, generator=generator).to(p.dtype)
        p.grad, q.grad = g, (None if g is None else g.clone())


def assert_same(model: nn.ModuleDict, ours: SlotAdamW, twin: nn.ModuleDict, oracle: OracleSlotAdamW) -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(p, q), name
        assert ours.state.get(p, {}).keys() == oracle.state.get(q, {}).keys(), name
        for key, value in ours.state.get(p, {}).items():
            expected = oracle.state[q][key]
            assert value.dtype == expected.dtype and value.shape == expected.shape, (name, key)
            assert torch.equal(value, expected), (name, key)


def prune_both(model: nn.ModuleDict, twin: nn.ModuleDict, name: str, slot: int) -> None:
    model[name].prune(slot)
    twin[name].prune(slot)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_slot_adamw_bit_identical_to_per_tensor_arithmetic(wd):
    model, ours, twin, oracle = optimizers(0, wd)
    generator = torch.Generator().manual_seed(1)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(12):
        set_grads(model, twin, generator, skip="k." if step == 3 else "")
        if step == 4:  # surgery: some slots restart their step counts and moments, so counts differ in a tensor
            for opt, m in ((ours, model), (oracle, twin)):
                for name, slots in (("q", [1, 3]), ("ffn", [0]), ("wide", [2, 17, 30]), ("bf16", [0])):
                    for param, dim in m[name].slot_params():
                        reset_slots(opt, param, dim, slots)
        if step == 7:  # live counts change: a prune swaps and shrinks the prefix
            prune_both(model, twin, "ffn", 2)
            prune_both(model, twin, "q", 0)
        ours.step()
        oracle.step()
        assert_same(model, ours, twin, oracle)
        if step == 4:
            counts = ours.state[model["q"].lora_A]["step"]
            assert counts[1] == 1 and counts[0] == 5 and counts[4] == 0
    assert torch.equal(model["empty"].lora_A, frozen["empty.lora_A"])  # live 0: never updated
    assert torch.equal(ours.state[model["empty"].lora_A]["step"], torch.zeros(8))
    dead = model["wide"].lora_B[:, 20:]
    assert torch.equal(dead, frozen["wide.lora_B"][:, 20:])  # dead slots: no update, no weight decay
    # lora_B with dead slots: its moments keep the slot axis outermost (a dense live prefix, staged updates)
    assert ours.state[model["wide"].lora_B]["exp_avg"].stride() == (1, 40)
    assert ours.state[model["lora"].lora_B]["exp_avg"].stride() == (1, 24)


def test_slot_adamw_uniform_counts_take_the_scalar_path_bit_identically():
    """LoRA's case: every live slot has the same count (one distinct value over all tensors)."""
    model, ours, twin, oracle = optimizers(3, 0.01)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        set_grads(model, twin, generator)
        ours.step()
        oracle.step()
    assert_same(model, ours, twin, oracle)
    counts = torch.cat(
        [
            ours.state[p]["step"][: slot_axis(p).live.count]
            for p in model.parameters()
            if slot_axis(p) is not None and slot_axis(p).live.count
        ]
    )
    assert counts.unique().tolist() == [5.0]


def test_slot_adamw_with_one_count_is_torch_adamw_on_the_live_slots():
    """The reference is torch itself: with one step count over all live slots (LoRA; a dynamic method before its
    first event), every float32/float64 live prefix and the head change bit for bit as under
    torch.optim.AdamW(foreach=True) run on copies of those prefixes, with the same groups; dead slots do not change
    at all."""
    model = slot_model(5)
    del model["bf16"]  # reduced precision: torch divides by a scalar as a multiply by its reciprocal
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    params = dict(model.named_parameters())

    def live(name: str, tensor: torch.Tensor) -> torch.Tensor:
        axis = slot_axis(params[name])
        return tensor if axis is None else tensor.narrow(axis.dim, 0, axis.live.count)

    copies = {n: nn.Parameter(live(n, params[n].detach()).clone()) for n in names}
    groups = [names[::2], names[1::2]]
    ours = SlotAdamW([{"params": [params[n] for n in g], "lr": lr} for g, lr in zip(groups, (3e-2, 1e-2), strict=True)],
                     weight_decay=0.05)
    torch_adamw = torch.optim.AdamW(
        [{"params": [copies[n] for n in g], "lr": lr} for g, lr in zip(groups, (3e-2, 1e-2), strict=True)],
        weight_decay=0.05, foreach=True,
    )
    before = {n: params[n].detach().clone() for n in names}
    generator = torch.Generator().manual_seed(6)
    for _ in range(6):
        for n in names:
            grad = torch.randn(params[n].shape, generator=generator, dtype=params[n].dtype)
            params[n].grad, copies[n].grad = grad, live(n, grad).clone()
        ours.step()
        torch_adamw.step()
        for n in names:
            assert torch.equal(live(n, params[n].detach()), copies[n].detach()), n
    wide = params["wide.lora_B"]
    assert torch.equal(wide[:, 20:], before["wide.lora_B"][:, 20:])  # dead slots: untouched
    assert not torch.equal(wide[:, :20], before["wide.lora_B"][:, :20])


def test_the_per_tensor_path_taken_off_the_cpu_has_the_same_arithmetic():
    """Tensors on an accelerator take ``_step_one``; run it on CPU tensors against the oracle, slot resets and a
    prune included, so a change to the formulas cannot reach only the GPU path."""
    model, ours, twin, oracle = optimizers(0, 0.05)
    generator = torch.Generator().manual_seed(7)
    for step in range(8):
        set_grads(model, twin, generator)
        if step == 3:
            for opt, m in ((ours, model), (oracle, twin)):
                for param, dim in m["wide"].slot_params():
                    reset_slots(opt, param, dim, [2, 17])
        if step == 5:
            prune_both(model, twin, "q", 0)
        for group in ours.param_groups:
            hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"])
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = ours.state[param] or ours._init_state(param)
                with torch.no_grad():
                    _step_one(param, param.grad, state, slot_axis(param), hyper)
        oracle.step()
        assert_same(model, ours, twin, oracle)


def test_slot_adamw_state_dict_roundtrip_and_replaced_tensors():
    """Loading a state dict (new state tensors) or replacing a parameter's data must not leave stale views."""
    model, ours, twin, oracle = optimizers(0, 0.01)
    generator = torch.Generator().manual_seed(4)

    def step_both(opt=None):
        set_grads(model, twin, generator)
        (opt or ours).step()
        oracle.step()
        assert_same(model, opt or ours, twin, oracle)

    for _ in range(2):
        step_both()
    saved, saved_oracle = copy.deepcopy(ours.state_dict()), copy.deepcopy(oracle.state_dict())
    step_both()
    ours.load_state_dict(copy.deepcopy(saved))
    oracle.load_state_dict(copy.deepcopy(saved_oracle))
    step_both()
    for m in (model, twin):
        m["q"].lora_A.data = m["q"].lora_A.data.clone()
    step_both()
    restored = SlotAdamW([{"params": g["params"]} for g in ours.param_groups])
    restored.load_state_dict(copy.deepcopy(ours.state_dict()))
    step_both(restored)


# ------------------------------------------------------------------------------------------------ penalty
def penalty_layers(ranks, shapes, max_rank=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for rank, (d_in, d_out) in zip(ranks, shapes, strict=True):
        layer = SlotLoRALayer(
            nn.Linear(d_in, d_out, dtype=dtype),
            form="svd",
            rank=4,
            max_rank=max_rank,
            init_rank=rank,
            generator=generator,
        )
        with torch.no_grad():  # trained-looking factors: far from orthogonal, no exact zero in the residual
            layer.lora_A.mul_(20)
            layer.lora_B.mul_(15)
        layers.append(layer)
    return layers


def penalty_and_grads(fn, layers, form, preset):
    for i, layer in enumerate(layers):
        for param, _ in layer.slot_params():
            param.grad = None if preset is None else torch.full_like(param, preset * (i + 1))
    value = fn(layers, form)
    value.backward()
    return value.detach(), [
        None if p.grad is None else p.grad.clone() for layer in layers for p, _ in layer.slot_params()
    ]


MIXED_RANKS = [4, 0, 8, 3, 4, 1, 4, 5, 3, 8, 0, 7, 2, 4]
# (in, out) in units of 48: several matrices share a live rank and a shape, some are alone in their group
MIXED_SHAPES = [
    (48 * (code // 10), 48 * (code % 10)) for code in (11, 11, 12, 21, 11, 21, 12, 11, 11, 11, 22, 11, 22, 21)
]


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize(("preset", "dtype"), [(None, torch.float32), (0.25, torch.float32), (None, torch.float64)])
def test_penalty_bit_identical_with_mixed_live_ranks(form, preset, dtype):
    layers = penalty_layers(MIXED_RANKS, MIXED_SHAPES, dtype=dtype)
    expected, expected_grads = penalty_and_grads(oracle_penalty, layers, form, preset)
    value, grads = penalty_and_grads(orthogonality_penalty, layers, form, preset)
    assert torch.equal(value, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got is None) == (want is None)
        assert got is None or torch.equal(got, want)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_penalty_bit_identical_minilm_shapes_full_and_odd_ranks(form):
    """MiniLM's six matrices per layer; odd ranks, a full-capacity rank (another backward layout) and rank 1."""
    shapes = [(384, 384)] * 4 + [(384, 1536), (1536, 384)]
    for ranks in ([8] * 12, [5] * 6 + [7] * 6, [16, 1, 9, 11, 16, 3] * 2):
        layers = penalty_layers(ranks, shapes * 2, max_rank=16, seed=len(ranks) + ranks[1])
        expected, expected_grads = penalty_and_grads(oracle_penalty, layers, form, None)
        value, grads = penalty_and_grads(orthogonality_penalty, layers, form, None)
        assert torch.equal(value, expected), ranks
        assert all(torch.equal(g, w) for g, w in zip(grads[::3], expected_grads[::3], strict=True)), ranks  # A
        assert all(torch.equal(g, w) for g, w in zip(grads[2::3], expected_grads[2::3], strict=True)), ranks  # B


def test_penalty_all_dead_is_zero_with_zero_gradient():
    layers = penalty_layers([0, 0], [(48, 48), (48, 96)])
    value, grads = penalty_and_grads(orthogonality_penalty, layers, "code", None)
    expected, expected_grads = penalty_and_grads(oracle_penalty, layers, "code", None)
    assert torch.equal(value, expected) and float(value) == 0.0
    assert all((g is None and w is None) or torch.equal(g, w) for g, w in zip(grads, expected_grads, strict=True))
