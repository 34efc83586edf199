"""The slot adapter layer, injection and the orthogonality penalty."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexlora.adapters import SlotLoRALayer, find_adapters, inject, orthogonality_penalty
from flexlora.errors import FlexLoRAError
from flexlora.plan import GrowSpec


def make_layer(form: str, rank: int = 3, max_rank: int = 6, in_f: int = 5, out_f: int = 7, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    return SlotLoRALayer(base, form=form, rank=rank, max_rank=max_rank, alpha=4.0,
                         generator=torch.Generator().manual_seed(seed))


def randomise(layer: SlotLoRALayer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        if layer.lora_E is not None:
            layer.lora_E.copy_(torch.randn(layer.lora_E.shape, generator=g))


@pytest.mark.parametrize("form", ["lora", "svd"])
def test_output_equals_frozen_base_at_init(form):
    layer = make_layer(form)
    x = torch.randn(4, 2, 5)
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("form", ["lora", "svd"])
def test_forward_equals_explicit_weight_update(form):
    layer = make_layer(form, rank=3, max_rank=6)
    randomise(layer)
    layer.prune(1)
    layer.grow(GrowSpec("zero_impact", 1.0, 0.0), torch.Generator().manual_seed(0))
    layer.grow(GrowSpec("zero_impact", 1.0, 0.0), torch.Generator().manual_seed(1))
    randomise(layer, seed=2)  # every live slot non-trivial; 4 live of 6
    assert layer.mask.tolist() == [True] * 4 + [False] * 2
    live = layer.mask.nonzero().flatten()
    a, b = layer.lora_A.detach()[live], layer.lora_B.detach()[:, live]
    scale = 4.0 / 3  # alpha / r0, independent of the live rank
    gains = layer.lora_E.detach()[live] if form == "svd" else torch.ones(len(live))
    delta = scale * b @ torch.diag(gains) @ a
    x = torch.randn(8, 5)
    expected = x @ (layer.base.weight.detach() + delta).t() + layer.base.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["lora", "svd"])
def test_masked_slots_contribute_nothing_and_get_zero_grad(form):
    layer = make_layer(form)
    randomise(layer)
    x = torch.randn(6, 5)
    layer.prune(1)  # slot 1 swaps with slot 2 and dies there: live prefix 0, 1
    assert layer.mask.tolist() == [True, True, False, False, False, False]
    out = layer(x)
    # changing a dead slot's vectors changes nothing, bit for bit
    with torch.no_grad():
        layer.lora_A[2:].normal_()
        layer.lora_B[:, 2:].normal_()
    assert torch.equal(layer(x), out)
    layer(x).square().sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad[2:]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, 2:]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[0]) > 0
    if form == "svd":
        assert torch.count_nonzero(layer.lora_E.grad[2:]) == 0 and layer.lora_E.grad[0] != 0
    for p in layer.base.parameters():
        assert p.grad is not None  # base is not frozen by the layer itself; inject() freezes


def test_prune_and_grow_change_live_rank():
    layer = make_layer("svd", rank=3, max_rank=5)
    assert layer.live_rank == 3
    randomise(layer)
    before = {i: layer.lora_A.detach()[i].clone() for i in range(3)}
    assert layer.prune(1) == (1, 2)  # slot 1 swaps places with the last live slot, which dies
    assert layer.live_rank == 2 and layer.mask.tolist() == [True, True, False, False, False]
    assert torch.equal(layer.lora_A[1], before[2]) and torch.equal(layer.lora_A[2], before[1])
    assert layer.lora_E[2] == 0  # a dead slot's lambda is zero, so a revival starts at zero impact
    slot = layer.grow(GrowSpec("zero_impact", 1.0, 0.0), torch.Generator().manual_seed(0))
    assert slot == 2 and layer.live_rank == 3
    layer.grow(GrowSpec("zero_impact", 1.0, 0.0), torch.Generator().manual_seed(0))
    layer.grow(GrowSpec("zero_impact", 1.0, 0.0), torch.Generator().manual_seed(0))
    assert layer.live_rank == 5
    with pytest.raises(ValueError, match="no free slot"):
        layer.grow(GrowSpec("zero_impact", 1.0, 0.0), None)
    with pytest.raises(ValueError, match="not live"):
        layer.prune(5)


def test_grow_is_zero_impact_and_uses_the_given_generator():
    layer = make_layer("svd", rank=2, max_rank=4)
    randomise(layer)
    x = torch.randn(5, 5)
    before = layer(x)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    slot = layer.grow(GrowSpec("zero_impact", 1.0, 0.0), torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state), "grow must not touch the global RNG"
    assert torch.equal(layer(x), before)
    assert layer.lora_E[slot] == 0 and layer.lora_A[slot].abs().sum() > 0
    expected = torch.randn(5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(layer.lora_A[slot].detach(), expected)


def test_grow_init_variants():
    g = torch.Generator().manual_seed(0)
    layer = make_layer("svd", rank=3, max_rank=5, in_f=40, out_f=50)
    randomise(layer)
    with torch.no_grad():
        layer.lora_A.mul_(0.1)  # live rows of norm ~0.6, far from a std-2 draw's ~12.6
    live_a = layer.lora_A.detach()[:3].clone()
    live_b = layer.lora_B.detach()[:, :3].clone()
    s = layer.grow(GrowSpec("orthogonal", 2.0, 0.0), g)
    new_a, new_b = layer.lora_A.detach()[s], layer.lora_B.detach()[:, s]
    assert torch.allclose(live_a @ new_a, torch.zeros(3), atol=1e-4)
    assert torch.allclose(live_b.t() @ new_b, torch.zeros(3), atol=1e-4)
    # Gram-Schmidt init: orthogonal to the live slots, with the norm of a typical (median) live one
    assert new_a.norm().item() == pytest.approx(live_a.norm(dim=1).median().item(), rel=1e-5)
    assert new_b.norm().item() == pytest.approx(live_b.norm(dim=0).median().item(), rel=1e-5)
    assert layer.lora_E[s] == 0
    s = layer.grow(GrowSpec("all_zero", 1.0, 0.0), g)
    assert layer.lora_A[s].abs().sum() == 0 and layer.lora_B[:, s].abs().sum() == 0
    layer.prune(s)
    x = torch.randn(7, 40)
    before = layer(x).detach()
    s = layer.grow(GrowSpec("small_value", 1.0, 0.05), g)
    # grow_value is the new direction's effective singular value (alpha / r0) |lambda| |p| |q|
    a, b, lam = layer.lora_A.detach()[s], layer.lora_B.detach()[:, s], layer.lora_E.detach()[s]
    effective = layer.scale * lam.abs() * a.norm() * b.norm()
    assert effective.item() == pytest.approx(0.05, rel=1e-5)
    single = torch.linalg.matrix_norm(layer.scale * lam * torch.outer(b, a), ord=2)
    assert single.item() == pytest.approx(0.05, rel=1e-4)
    assert not torch.allclose(layer(x), before)  # not zero impact, by design


def test_grow_keeps_parameter_dtype():
    base = nn.Linear(4, 4).to(torch.float64)
    layer = SlotLoRALayer(base, form="svd", rank=1, max_rank=2)
    layer.grow(GrowSpec("zero_impact", 1.0, 0.0), torch.Generator().manual_seed(0))
    assert layer.lora_A.dtype == torch.float64 and layer.lora_A[1].abs().sum() > 0


def test_max_rank_below_rank_is_refused():
    with pytest.raises(AssertionError):  # the allocator config refuses it with a message; the layer asserts
        SlotLoRALayer(nn.Linear(3, 3), form="svd", rank=4, max_rank=2)


def test_init_rank_below_and_above_rank_keep_the_r0_scale():
    low = SlotLoRALayer(nn.Linear(3, 3), form="svd", rank=4, max_rank=8, init_rank=2, alpha=8.0)
    high = SlotLoRALayer(nn.Linear(3, 3), form="svd", rank=4, max_rank=8, init_rank=6, alpha=8.0)
    assert (low.live_rank, high.live_rank) == (2, 6) and low.scale == high.scale == 2.0


def test_loading_a_non_prefix_mask_brings_the_live_slots_to_the_front():
    """State written by older versions (masks with holes) loads into prefix form with the same function."""
    layer = make_layer("svd", rank=3, max_rank=5)
    randomise(layer)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["mask"] = torch.tensor([True, False, True, False, True])
    live = [0, 2, 4]
    x = torch.randn(4, 5)
    gain = layer.scale * state["lora_E"][live]
    expected = layer.base(x) + (x @ state["lora_A"][live].t() * gain) @ state["lora_B"][:, live].t()
    layer.load_state_dict(state)
    assert layer.live_rank == 3 and layer.mask.tolist() == [True, True, True, False, False]
    torch.testing.assert_close(layer(x), expected)


BERT_TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_inject_bert(tiny_bert, token_batch):
    before = tiny_bert(**token_batch).logits
    adapters = inject(tiny_bert, BERT_TARGETS, form="svd", rank=2, max_rank=4, head_modules=["classifier"])
    assert len(adapters) == 12  # 2 layers x (q, k, v, attn out, ffn in, ffn out)
    assert "bert.encoder.layer.0.attention.output.dense" in adapters
    assert "bert.encoder.layer.1.output.dense" in adapters
    assert not any("pooler" in n for n in adapters)
    for name in trainable_names(tiny_bert):
        assert "lora_" in name or name.startswith("classifier."), name
    assert "classifier.weight" in trainable_names(tiny_bert)
    assert torch.equal(tiny_bert(**token_batch).logits, before)
    assert set(find_adapters(tiny_bert)) == set(adapters)


def test_inject_deberta_v2(tiny_deberta, token_batch):
    adapters = inject(tiny_deberta, ["query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"],
                      form="svd", rank=2, head_modules=["classifier", "pooler"])
    names = set(adapters)
    assert len(names) == 12
    assert "deberta.encoder.layer.1.attention.self.query_proj" in names
    assert "deberta.encoder.layer.0.attention.output.dense" in names
    trainable = trainable_names(tiny_deberta)
    assert "pooler.dense.weight" in trainable and "classifier.weight" in trainable
    assert all("lora_" in n or n.startswith(("pooler.", "classifier.")) for n in trainable)
    tiny_deberta(**token_batch)


def test_inject_gpt2_conv1d(tiny_gpt2, token_batch):
    before = tiny_gpt2(**token_batch).logits
    adapters = inject(tiny_gpt2, r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
                      form="svd", rank=2, head_modules=["score"])
    assert len(adapters) == 8
    layer = adapters["transformer.h.0.attn.c_attn"]
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (16, 48)
    assert torch.equal(tiny_gpt2(**token_batch).logits, before)
    randomise(layer)
    x = torch.randn(2, 16)
    expected = layer.base(x) + x @ layer.delta_weight().t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert trainable_names(tiny_gpt2) >= {"score.weight"}


def test_inject_regex_is_full_match(tiny_bert):
    adapters = inject(tiny_bert, r".*\.query", form="lora", rank=2)
    assert len(adapters) == 2 and all(n.endswith(".query") for n in adapters)


def test_inject_nothing_matched_lists_names(tiny_bert):
    with pytest.raises(FlexLoRAError) as err:
        inject(tiny_bert, ["querry"], form="svd", rank=2)
    message = str(err.value)
    assert "match no linear layer" in message and "query" in message and "target_modules" in message


def test_inject_non_linear_match_is_refused(tiny_bert):
    with pytest.raises(FlexLoRAError, match=r"only nn\.Linear and Conv1D"):
        inject(tiny_bert, ["LayerNorm"], form="svd", rank=2)


def test_orthogonality_penalty_forms_and_live_slots_only():
    # mixed capacities and live ranks: the penalty stacks grams per live rank, which must not change the value
    layers = [make_layer("svd", rank=3, max_rank=m, seed=s) for s, m in enumerate((4, 4, 6))]
    for i, layer in enumerate(layers):
        randomise(layer, seed=10 + i)
    layers[2].grow(GrowSpec("zero_impact", 1.0, 0.0), torch.Generator().manual_seed(0))
    randomise(layers[2], seed=20)
    layers[1].prune(0)
    code_terms, paper_terms = [], []
    for layer in layers:
        r = layer.live_rank
        a, b = layer.lora_A.detach()[:r], layer.lora_B.detach()[:, :r]
        for m in (a @ a.t() - torch.eye(r), b.t() @ b - torch.eye(r)):
            code_terms.append(torch.linalg.norm(m))
            paper_terms.append(m.square().sum())
    code = orthogonality_penalty(layers, "code")
    paper = orthogonality_penalty(layers, "paper")
    torch.testing.assert_close(code, torch.stack(code_terms).mean())
    torch.testing.assert_close(paper, torch.stack(paper_terms).sum())
    # the dead slots' vectors do not enter
    with torch.no_grad():
        layers[0].lora_A[3].mul_(100)
        layers[1].lora_A[2].mul_(100)
    again = orthogonality_penalty(layers, "code")
    torch.testing.assert_close(again, code)
    again.backward()
    assert torch.count_nonzero(layers[0].lora_A.grad[3]) == 0
    assert torch.count_nonzero(layers[1].lora_B.grad[:, 2:]) == 0


def test_a_plan_that_grows_without_a_grow_spec_is_refused():
    from flexlora.adapters import apply_plan
    from flexlora.plan import RankPlan

    layer = SlotLoRALayer(nn.Linear(8, 8), form="svd", rank=2, max_rank=4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="grow_spec"):
        apply_plan({"m": layer}, RankPlan(step=1, grow={"m": 1}), torch.Generator().manual_seed(0))
    assert layer.live_rank == 2
