"""Forward hooks that record, for every tracked module, its inputs and (in-graph) outputs.

The output tensors are later differentiated with ``torch.autograd.grad`` so that parameter ``.grad``, the
optimizer and any DDP reducer never see the tracking pass. Modules whose per-example gradients need their
weights (norm layers and other non-linear modules, see ``modules.needs_weights``) also get a copy of their
tracked parameters taken inside their forward: under FSDP and ZeRO-3 that is the only moment the parameters are
whole, and reading them there needs no collective of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import sharding
from .modules import Block, needs_weights


@dataclass
class Call:
    """One forward call of a tracked module: its first positional input, its output, and (for modules that need
    them) the values of its tracked parameters as used by this call, by attribute name."""

    inputs: torch.Tensor
    output: torch.Tensor
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    flat: bool = False  # the module saw (batch * width, ...) rows; inputs were viewed back as (batch, width, ...)


@dataclass
class Capture:
    """Records module calls while armed; ignores calls made during backward (activation recomputation).

    Gradient checkpointing replays a module's forward inside the backward pass, firing its hooks a second
    time. Those replays are not new uses of the weights, so only calls made while ``recording`` is True count.

    With ``embedding`` (the input-embedding module) it also keeps that module's outputs in ``embedding_outputs``.
    ``copy_weights`` copies the recorded parameter values (needed when the model is sharded, whose gathered
    parameters are freed after use).
    """

    blocks: list[Block]
    embedding: nn.Module | None = None
    copy_weights: bool = False
    calls: dict[int, list[Call]] = field(default_factory=dict)
    embedding_outputs: list[torch.Tensor] = field(default_factory=list)
    recording: bool = False
    batch_size: int = 0  # examples in the micro-batch being recorded, and its padded width
    width: int = 0
    _names: dict[int, str] = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    _weights: dict[int, set[str]] = field(default_factory=dict)
    _pending: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)

    def __enter__(self) -> Capture:
        modules: dict[int, nn.Module] = {}
        for block in self.blocks:
            for name, module in block.modules:
                modules[id(module)] = module
                self._names[id(module)] = name
                if needs_weights(module):
                    self._weights.setdefault(id(module), set()).update(block.tracked(module))
        for mid, module in modules.items():
            if mid in self._weights:
                # Registered last, so it runs after a ZeRO-3 pre-hook has gathered the parameters.
                self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            # Registered last too: it records the output the rest of the model consumes, after ZeRO-3's forward
            # hook has wrapped it in its pre-backward function. Were it recorded before, differentiating w.r.t.
            # the earliest tracked output (the input embedding's) would run that function, which gathers the
            # module's parameters for a backward that never reaches the module and so never releases them.
            self._handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
        if self.embedding is not None:
            self._handles.append(self.embedding.register_forward_hook(self._embedding_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.calls.clear()
        self.embedding_outputs.clear()
        self._weights.clear()
        self._pending.clear()

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if not self.recording:
            return
        attrs = sorted(self._weights[id(module)])
        values = {attr: sharding.full_value(getattr(module, attr), self.copy_weights) for attr in attrs}
        self._pending.setdefault(id(module), []).append(values)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not self.recording:
            return
        name = self._names.get(id(module), type(module).__name__)
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"Tracked module {name!r} was called without a tensor input.")
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Tracked module {name!r} returned {type(output).__name__}, not a tensor.")
        if id(module) in self._weights and (
            any(isinstance(a, torch.Tensor) for a in args[1:])
            or any(isinstance(v, torch.Tensor) for v in kwargs.values())
        ):
            # Its per-example gradients come from replaying the module on its first input alone.
            raise NotImplementedError(
                f"Tracked module {name!r} ({type(module).__name__}) takes more than one tensor input (e.g. a gated "
                "norm); its per-example gradients are not supported. Exclude its parameters with param_filter."
            )
        inputs, flat = self._per_example(name, args[0].detach())
        pending = self._pending.get(id(module))
        params = pending.pop() if pending else {}
        self.calls.setdefault(id(module), []).append(Call(inputs, output, params, flat))

    def _per_example(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``x`` with the example axis first; a module fed flattened tokens gets its rows viewed back."""
        if x.shape[0] == self.batch_size:
            return x, False
        if x.dim() >= 2 and x.shape[0] == self.batch_size * self.width:
            return x.reshape(self.batch_size, self.width, *x.shape[1:]), True
        raise NotImplementedError(
            f"Tracked module {name!r} was called on {x.shape[0]} rows for a micro-batch of {self.batch_size} "
            "examples (e.g. a routed mixture-of-experts layer), so its rows cannot be attributed to examples. "
            "Exclude its parameters with param_filter."
        )

    def output_grads(self, grads: tuple, length: int) -> dict[int, list[torch.Tensor]]:
        """Per module, the output gradient of each recorded call, aligned with ``calls``.

        Gradients of unused outputs (None) become zeros; flattened calls are viewed as ``(batch, width, ...)``.
        Linear and embedding calls are cut to the ``length`` real token positions (beyond, every output gradient
        is zero) per call, so several calls of one module stay aligned.
        """
        out, k = {}, 0
        for mid, calls in self.calls.items():
            per_call = []
            for call, g in zip(calls, grads[k : k + len(calls)], strict=True):
                g = torch.zeros_like(call.output) if g is None else g
                if call.flat:
                    g = g.reshape(*call.inputs.shape[:2], *g.shape[1:])
                if mid not in self._weights and call.inputs.dim() >= 2 and call.inputs.shape[1] == self.width:
                    call.inputs, g = call.inputs[:, :length], g[:, :length]
                per_call.append(g)
            out[mid] = per_call
            k += len(calls)
        return out

    def _embedding_hook(self, module: nn.Module, args: tuple, output) -> None:
        if self.recording and isinstance(output, torch.Tensor) and output.requires_grad:
            self.embedding_outputs.append(output)

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
