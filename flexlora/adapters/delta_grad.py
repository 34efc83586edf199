"""The gradient of the loss with respect to each adapter's update dW, for allocators that score with it.

The slot layer never forms dW, so autograd never produces dL/d(dW). It is still cheap to recover: the adapter
adds ``x dW^T`` to the layer's output, so ``dL/d(dW) = g^T x`` summed over tokens, with ``g`` the gradient of the
layer's output and ``x`` its input. A forward hook keeps ``x`` (autograd keeps it anyway) and a tensor hook on the
output adds ``g^T x`` to a per-matrix accumulator during backward: the whole step's gradient, micro-batches of
gradient accumulation included. One (out x in) matmul per matrix and micro-batch, about the cost of a frozen
weight's gradient; :meth:`DeltaGradRecorder.close` removes the hooks once the allocator no longer needs them.
``x`` is the layer's input before the adapter's dropout (default 0, where the two are the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from flexlora.adapters.layer import SlotLoRALayer


class DeltaGradRecorder:
    """Accumulates dL/d(dW) per adapted matrix between :meth:`pop` calls (local to this process)."""

    def __init__(self, adapters: Mapping[str, SlotLoRALayer]) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._forward_hook(name)) for name, layer in adapters.items()]

    def _forward_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and module.training and output.requires_grad):
                return
            x = inputs[0].detach()
            output.register_hook(lambda grad: self._accumulate(name, grad, x))

        return hook

    @torch.no_grad()
    def _accumulate(self, name: str, grad: torch.Tensor, x: torch.Tensor) -> None:
        g = grad.reshape(-1, grad.shape[-1]).float()
        step = g.t() @ x.reshape(-1, x.shape[-1]).float()
        if name in self.grads:
            self.grads[name] += step
        else:
            self.grads[name] = step

    def pop(self, name: str) -> torch.Tensor | None:
        """This step's dL/d(dW) of one matrix (out x in), or None when it saw no backward; resets it."""
        return self.grads.pop(name, None)

    def clear(self) -> None:
        self.grads.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.grads.clear()
