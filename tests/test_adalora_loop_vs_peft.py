"""AdaLoRA in a real training loop against peft: the same tiny model, data order, init, schedule and clipping,
trained once with peft's AdaLoRA (``update_and_allocate`` after every optimizer step) and once through this
framework's Callback. The rank pattern after every masking step must be equal: this sees the order of scoring
(after the optimizer step, on the updated weights and the clipped gradients), which feeding both sides the same
tensors cannot. Differences kept out of the comparison: dropout (off on both sides; the two loops draw its RNG
differently) and float rounding (peft scales by alpha / (r + 1e-5) in another operation order).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from transformers import get_linear_schedule_with_warmup

from flexlora.adapters.penalty import orthogonality_penalty
from flexlora.export import unwrap
from flexlora.train import build
from tests.helpers import tiny_run_config

T, T_INIT, T_FINAL, DELTA, R0, TARGET, ALPHA, LR, EPS, WD = 64, 8, 16, 4, 4, 2, 8.0, 2e-3, 1e-6, 0.01
DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "pooler_dropout")
NO_DROPOUT = [f"+backbone.config.{k}=0.0" for k in DROPOUTS]


class PatternProbe(L.Callback):
    """After each allocation event: which slots of every matrix carry a non-zero lambda (the masked pattern)."""

    def __init__(self, allocation) -> None:
        self.allocation, self.seen, self.patterns = allocation, 0, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.allocation.events > self.seen:
            self.seen = self.allocation.events
            self.patterns[trainer.global_step] = {
                name: (layer.lora_E.detach() != 0)[: layer.max_rank].tolist() if layer.live_rank == layer.max_rank
                else [i < layer.live_rank for i in range(layer.max_rank)] for name, layer in pl_module.adapters.items()}


def _peft_loop(module, datamodule, base) -> tuple[dict[int, dict[str, list[bool]]], float]:
    names = list(module.adapters)
    config = AdaLoraConfig(init_r=R0, target_r=TARGET, tinit=T_INIT, tfinal=T_FINAL, deltaT=DELTA, total_step=T,
                           lora_alpha=ALPHA, lora_dropout=0.0, beta1=0.85, beta2=0.85, orth_reg_weight=0.1,
                           target_modules=names, modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    inner = model.base_model.model
    with torch.no_grad():  # the same initial adapters as the framework's run
        for name, layer in module.initial_adapters.items():
            target = inner.get_submodule(name)
            target.lora_A["default"].copy_(layer["A"])
            target.lora_E["default"].copy_(layer["E"].view(-1, 1))
            target.lora_B["default"].copy_(layer["B"])
            target.ranknum["default"].fill_(R0 - 1e-5)  # peft scales by alpha / (ranknum + 1e-5): make it alpha / r0
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in trainable if "bias" in n or "LayerNorm" in n]
    decay = [p for n, p in trainable if not ("bias" in n or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, eps=EPS,
                                  weight_decay=WD, foreach=False)
    scheduler = get_linear_schedule_with_warmup(optimizer, 4, T)
    model.train()
    patterns, step, first_penalty = {}, 0, None
    loader = datamodule.train_dataloader()
    while step < T:
        loader.sampler.set_epoch(step // len(loader))
        for batch in loader:
            step += 1
            inputs = {k: v for k, v in batch.items() if k != "idx"}
            loss = model(**inputs).loss  # peft adds its orthogonality penalty to outputs.loss
            if first_penalty is None:
                first_penalty = float(_peft_penalty(inner))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
            optimizer.step()
            scheduler.step()
            before = dict(config.rank_pattern or {})
            model.base_model.update_and_allocate(step)
            after = config.rank_pattern or {}
            if after and (after != before or step == T - T_FINAL or (step < T - T_FINAL and step % DELTA == 0
                                                                      and step > T_INIT)):
                patterns[step] = {name: [bool(v) for v in _entry(after, name)] for name in names}
            optimizer.zero_grad()
            if step == T:
                break
    return patterns, first_penalty


def _entry(pattern: dict, name: str) -> list:
    """peft's rank_pattern entry of one matrix (its keys carry peft's module prefix)."""
    found = [v for k, v in pattern.items() if k.endswith(f"{name}.lora_E") or k.endswith(f"{name}.lora_E.default")]
    assert len(found) == 1, f"{name}: {len(found)} entries in peft's rank pattern, e.g. {next(iter(pattern))}"
    return found[0]


def _peft_penalty(inner) -> torch.Tensor:
    terms = []
    for n, p in inner.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and "default" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.norm(cov - torch.eye(cov.shape[0]), p="fro"))
    return sum(terms) / len(terms)


@pytest.mark.slow
def test_adalora_rank_pattern_equals_peft_in_a_real_loop(tmp_path, glue_dir):
    cfg = tiny_run_config(
        tmp_path / "ours", glue_dir, "allocator=adalora", f"allocator.rank={R0}", f"allocator.target_rank={TARGET}",
        f"allocator.alpha={ALPHA}", f"allocator.t_init={T_INIT}", f"allocator.t_final={T_FINAL}",
        f"allocator.delta_t={DELTA}", f"trainer.max_steps={T}", "trainer.gradient_clip_val=1.0",
        "model.warmup_steps=4", f"model.optimizer.lr={LR}", f"model.optimizer.eps={EPS}", *NO_DROPOUT,
    )
    datamodule, module, trainer, allocation = build(cfg)
    module.initial_adapters = {n: {"A": layer.lora_A.detach().clone(), "E": layer.lora_E.detach().clone(),
                                   "B": layer.lora_B.detach().clone()} for n, layer in module.adapters.items()}
    base = unwrap(module.model)  # the same backbone and head, without adapters
    our_penalty = float(orthogonality_penalty(module.adapters.values(), "code"))
    probe = PatternProbe(allocation)
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=datamodule)

    theirs, their_penalty = _peft_loop(module, datamodule, base)
    assert abs(our_penalty - their_penalty) < 1e-5, "the penalty over all (soft-masked included) slots must agree"
    masking_steps = [t for t in range(T_INIT + 1, T - T_FINAL) if t % DELTA == 0] + [T - T_FINAL]
    assert sorted(probe.patterns) == masking_steps
    assert sorted(theirs) == masking_steps
    for step in masking_steps[:-1]:  # soft masking: the same slots of every matrix carry lambda = 0
        for name, ours in probe.patterns[step].items():
            assert ours == theirs[step][name], f"{name}: the mask differs from peft's at step {step}"
    final = masking_steps[-1]  # the fixed pattern: masked slots die (ours swap them out of the live prefix)
    assert {n: sum(v) for n, v in probe.patterns[final].items()} == {n: sum(v) for n, v in theirs[final].items()}
    assert sum(layer.live_rank for layer in module.adapters.values()) == TARGET * len(module.adapters)
