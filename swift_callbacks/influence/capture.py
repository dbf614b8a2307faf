"""Forward hooks that record, for every tracked module, its inputs and (in-graph) outputs.

The output tensors are later differentiated with ``torch.autograd.grad`` so that parameter ``.grad``, the
optimizer and any DDP reducer never see the tracking pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .modules import Block


@dataclass
class Call:
    """One forward call of a tracked module: its first positional input and its output."""

    inputs: torch.Tensor
    output: torch.Tensor


@dataclass
class Capture:
    """Records module calls while armed; ignores calls made during backward (activation recomputation).

    Gradient checkpointing replays a module's forward inside the backward pass, firing its hooks a second
    time. Those replays are not new uses of the weights, so only calls made while ``recording`` is True count.
    """

    blocks: list[Block]
    calls: dict[int, list[Call]] = field(default_factory=dict)
    recording: bool = False
    _handles: list = field(default_factory=list)

    def __enter__(self) -> Capture:
        seen: set[int] = set()
        for block in self.blocks:
            for _, module in block.modules:
                if id(module) in seen:
                    continue
                seen.add(id(module))
                self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.calls.clear()

    def _hook(self, module: nn.Module, args: tuple, output) -> None:
        if not self.recording:
            return
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"Tracked module {type(module).__name__} was called without a tensor input.")
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Tracked module {type(module).__name__} returned {type(output).__name__}, not a tensor.")
        self.calls.setdefault(id(module), []).append(Call(args[0].detach(), output))

    def outputs(self) -> list[torch.Tensor]:
        """All recorded output tensors, in a fixed order (for ``torch.autograd.grad``)."""
        return [call.output for calls in self.calls.values() for call in calls]


def make_inputs_require_grad(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the input-embedding output require grad so outputs are differentiable even if the
    parameters before the first tracked module are frozen (and, under activation checkpointing, so the
    recomputed segments take part in autograd)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor) and not output.requires_grad and output.is_floating_point():
            return output.requires_grad_(True)
        return output

    return model.get_input_embeddings().register_forward_hook(hook)
