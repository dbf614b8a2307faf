"""Forward hooks that record, for every tracked module, each call's inputs and (in-graph) outputs.

The output tensors are later differentiated with ``torch.autograd.grad`` so that parameter ``.grad``, the
optimizer and any DDP reducer never see the tracking pass. Modules on the generic rule (anything but an exact
``nn.Linear`` / ``nn.Embedding``, see ``modules.rule``) are replayed later on their recorded arguments, so every
argument is kept, and so is a copy of their tracked parameters taken inside their forward: under FSDP and ZeRO-3
that is the only moment the parameters are whole, and reading them there needs no collective of its own.

Each recorded tensor is classified by how it carries the micro-batch's example axis (``Layout``): rows in
example order (``(B, ...)``), flattened token rows (``(B * T, ...)``, e.g. a shared MoE expert), or one copy
shared by every example (e.g. position ids of shape ``(1, T)``). A module whose output is shared across examples
gets its output expanded to ``(B, ...)`` during the tracking pass, so its output gradient stays per example.
None of this is trusted blindly: ``verify.py`` checks the reconstruction against autograd on the live model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import sharding
from .modules import Block, UnsupportedModelError, get_path, rule


class Layout(enum.Enum):
    BATCHED = "batched"  # (B, ...)
    FLAT = "flat"  # (B * T, ...)
    SHARED = "shared"  # one value for every example


@dataclass
class Call:
    """One forward call of a tracked module.

    Attributes:
        args: Positional arguments (tensors detached).
        kwargs: Keyword arguments (tensors detached).
        layouts: Layout of every tensor leaf of ``(args, kwargs)``, by leaf position.
        outputs: The floating-point output tensors the rest of the model consumes (what is differentiated).
        out_index: Leaf positions of ``outputs`` in the module's output structure.
        out_layouts: Layout of each output before any expansion (``SHARED`` outputs were expanded to ``B``).
        params: Values of the tracked parameters as this call used them (generic-rule modules only).
        autocast: The autocast state the call ran under, so a replay computes in the same precision.
        grads: Gradient of the summed loss w.r.t. each output, ``(B, ...)`` (``FLAT`` ones viewed as
            ``(B, T, ...)``); set after the backward.
    """

    args: tuple
    kwargs: dict
    layouts: dict[int, Layout]
    outputs: list[torch.Tensor]
    out_index: list[int]
    out_layouts: list[Layout]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: list[torch.Tensor] | None = None
    autocast: tuple[str, bool, torch.dtype] | None = None  # (device type, enabled, dtype) during the call

    @property
    def flat(self) -> bool:
        return self.out_layouts[0] is Layout.FLAT

    def per_example_input(self, batch: int, width: int) -> torch.Tensor:
        """The first positional input with the example axis first: ``(B, ...)``."""
        x, layout = self.args[0], self.layouts[0]
        if layout is Layout.FLAT:
            return x.reshape(batch, width, *x.shape[1:])
        if layout is Layout.SHARED:
            return x.expand(batch, *x.shape[1:]) if x.dim() else x.expand(batch)
        return x


@dataclass
class Capture:
    """Records module calls while armed; ignores calls made during backward (activation recomputation).

    Gradient checkpointing replays a module's forward inside the backward pass, firing its hooks a second
    time. Those replays are not new uses of the weights, so only calls made while ``recording`` is True count.

    With ``embedding`` (the input-embedding module) it also keeps that module's outputs in ``embedding_outputs``.
    ``copy_weights`` copies the recorded parameter values (needed when the model is sharded, whose gathered
    parameters are freed after use). ``keep_params`` records, per block parameter slot, the parameter tensor
    objects each call used (for the verification's autograd reference).
    """

    blocks: list[Block]
    embedding: nn.Module | None = None
    copy_weights: bool = False
    keep_params: bool = False
    calls: dict[int, list[Call]] = field(default_factory=dict)
    embedding_outputs: list[torch.Tensor] = field(default_factory=list)
    used_params: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)
    expanded: list[str] = field(default_factory=list)  # modules whose shared output was expanded per example
    recording: bool = False
    # Set when ``watch`` (the model's input embedding) runs while recording: a forward that runs none of the
    # tracked modules and not even that one is not this model's (see the engine).
    watch: nn.Module | None = None
    embedding_ran: bool = False
    batch_size: int = 0  # examples in the micro-batch being recorded, and its padded width
    width: int = 0
    _names: dict[int, str] = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    _weights: dict[int, set[str]] = field(default_factory=dict)
    _tracked: dict[int, set[str]] = field(default_factory=dict)
    _pending: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    _rules: dict[int, str] = field(default_factory=dict)  # each module's rule, read once on entry

    def __enter__(self) -> Capture:
        modules: dict[int, nn.Module] = {}
        for block in self.blocks:
            for name, module in block.modules:
                modules[id(module)] = module
                self._names[id(module)] = name
                self._tracked.setdefault(id(module), set()).update(block.tracked(module))
                self._rules[id(module)] = rule(module)
                if self._rules[id(module)] == "generic":
                    self._weights.setdefault(id(module), set()).update(block.tracked(module))
        for module in modules.values():
            # Registered last, so it runs after a ZeRO-3 / FSDP pre-hook has gathered the parameters.
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            # Registered last too: it records the output the rest of the model consumes, after ZeRO-3's forward
            # hook has wrapped it in its pre-backward function. Were it recorded before, differentiating w.r.t.
            # the earliest tracked output (the input embedding's) would run that function, which gathers the
            # module's parameters for a backward that never reaches the module and so never releases them.
            self._handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
        if self.embedding is not None:
            self._handles.append(self.embedding.register_forward_hook(self._embedding_hook))
        if self.watch is not None:
            self._handles.append(self.watch.register_forward_hook(self._watch_hook))
        return self

    def _watch_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.embedding_ran = self.embedding_ran or self.recording

    def __exit__(self, *exc) -> None:
        self.detach()
        self.reset()
        for table in (self._weights, self._rules, self._tracked, self._names):
            table.clear()

    def detach(self) -> None:
        """Remove the hooks (for good: a capture is entered once)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget the micro-batch recorded (its calls, tensors and flags); the hooks stay attached for the next."""
        self.calls.clear()
        self.embedding_outputs.clear()
        self.used_params.clear()
        self.expanded.clear()
        self._pending.clear()
        self.recording = self.embedding_ran = False

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if not self.recording:
            return
        if self.keep_params:
            for attr in self._tracked[id(module)]:
                self.used_params.setdefault((id(module), attr), []).append(get_path(module, attr))
        if id(module) in self._weights:
            attrs = sorted(self._weights[id(module)])
            values = {attr: sharding.full_value(get_path(module, attr), self.copy_weights) for attr in attrs}
            self._pending.setdefault(id(module), []).append(values)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.recording:
            return None
        name = self._names.get(id(module), type(module).__name__)
        if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            leaves, out_leaves, out_spec = list(args), [output], None  # the common call, without pytree's cost
        else:
            leaves, _ = pytree.tree_flatten((args, kwargs))
            out_leaves, out_spec = pytree.tree_flatten(output)
        layouts = {i: self._layout(name, t, strict=i == 0) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)}
        out_index = [i for i, t in enumerate(out_leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not out_index:
            raise UnsupportedModelError(
                f"Tracked module {name!r} ({type(module).__name__}) returned no floating-point tensor, so its "
                "parameters' gradients cannot be followed. Exclude its parameters with param_filter."
            )
        module_rule = self._rules[id(module)]
        if module_rule != "generic":
            if not args or not isinstance(args[0], torch.Tensor) or len(out_index) != 1:
                raise UnsupportedModelError(
                    f"Tracked module {name!r} ({type(module).__name__}) was called without a positional tensor "
                    "input (e.g. as module(input=x)); its per-example gradients cannot be attributed. Exclude its "
                    "parameters with param_filter."
                )
            if module_rule == "embedding" and args[0].is_floating_point():
                raise UnsupportedModelError(f"Embedding {name!r} was called on floating-point input, not token ids.")
        out_layouts = [self._layout(name, out_leaves[i], strict=True) for i in out_index]
        changed = len(out_index) > 1
        if changed:
            # One output may be computed from another (a router's scores from its logits): the gradient w.r.t.
            # the inner one would then include the path through the other and be counted twice. Hand the model
            # a new alias of each, so each is differentiated only for its uses outside the module.
            for i in out_index:
                out_leaves[i] = out_leaves[i].view_as(out_leaves[i])
        for k, i in enumerate(out_index):
            if out_layouts[k] is Layout.SHARED:
                # One output for every example (e.g. position embeddings of shape (1, T)): give each example its
                # own copy so the output gradient stays per example. Values are unchanged.
                t = out_leaves[i]
                if t.dim() == 0:
                    raise UnsupportedModelError(
                        f"Tracked module {name!r} ({type(module).__name__}) returned a scalar shared by the whole "
                        "micro-batch; its gradient cannot be split by example. Exclude it with param_filter."
                    )
                out_leaves[i] = t.expand(self.batch_size, *t.shape[1:])
                changed = True
                if name not in self.expanded:
                    self.expanded.append(name)
        pending = self._pending.get(id(module))
        params = pending.pop() if pending else {}
        if out_spec is None:
            detached = ((args[0].detach(),), {})
        else:
            detached = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (args, kwargs))
        device_type = out_leaves[out_index[0]].device.type
        self.calls.setdefault(id(module), []).append(
            Call(
                args=detached[0], kwargs=detached[1], layouts=layouts,
                outputs=[out_leaves[i] for i in out_index], out_index=out_index, out_layouts=out_layouts,
                params=params,
                autocast=(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)),
            )
        )  # fmt: skip
        if not changed:
            return None
        return out_leaves[0] if out_spec is None else pytree.tree_unflatten(out_leaves, out_spec)

    def _layout(self, name: str, x: torch.Tensor, strict: bool) -> Layout:
        """How ``x`` carries the example axis of the micro-batch being recorded.

        A first input or an output whose rows match no layout cannot be attributed to examples (``strict``);
        any other argument of another size is taken as shared, which the verification checks.
        """
        if x.dim() >= 1 and x.shape[0] == self.batch_size:
            return Layout.BATCHED
        if x.dim() >= 1 and x.shape[0] == self.batch_size * self.width:
            return Layout.FLAT
        if x.dim() == 0 or x.shape[0] == 1 or not strict:
            return Layout.SHARED
        raise UnsupportedModelError(
            f"Tracked module {name!r} was called on {x.shape[0]} rows for a micro-batch of {self.batch_size} "
            f"examples of {self.width} positions (neither one row per example nor one per token, e.g. a routed "
            "expert or a layer over heads), so its rows cannot be attributed to examples. Exclude its parameters "
            "with param_filter."
        )

    def set_output_grads(self, grads: tuple, length: int) -> None:
        """Attach to every recorded call the gradient of each of its outputs (aligned with ``outputs()``).

        Gradients of unused outputs (None) become zeros; flattened outputs are viewed as ``(batch, width, ...)``.
        Calls of exact linear/embedding modules are cut to the ``length`` real token positions (beyond, every
        output gradient is zero) per call, so several calls of one module stay aligned.
        """
        k = 0
        for mid, calls in self.calls.items():
            cut = mid not in self._weights
            for call in calls:
                per_output = []
                for out, layout, g in zip(
                    call.outputs, call.out_layouts, grads[k : k + len(call.outputs)], strict=True
                ):
                    g = torch.zeros_like(out) if g is None else g
                    if layout is Layout.FLAT:
                        g = g.reshape(self.batch_size, self.width, *g.shape[1:])
                    per_output.append(g)
                k += len(call.outputs)
                if cut:
                    inputs = call.per_example_input(self.batch_size, self.width)
                    if inputs.dim() >= 2 and inputs.shape[1] == self.width and per_output[0].shape[1] == self.width:
                        inputs, per_output = inputs[:, :length], [per_output[0][:, :length]]
                    call.args = (inputs, *call.args[1:])
                    call.layouts = {**call.layouts, 0: Layout.BATCHED}
                call.grads = per_output

    def _embedding_hook(self, module: nn.Module, args: tuple, output) -> None:
        if self.recording and isinstance(output, torch.Tensor) and output.requires_grad:
            self.embedding_outputs.append(output)

    def outputs(self) -> list[torch.Tensor]:
        """All recorded output tensors, in a fixed order (for ``torch.autograd.grad``)."""
        return [out for calls in self.calls.values() for call in calls for out in call.outputs]


def make_inputs_require_grad(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the input-embedding output require grad so outputs are differentiable even if the
    parameters before the first tracked module are frozen (and, under activation checkpointing, so the
    recomputed segments take part in autograd)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor) and not output.requires_grad and output.is_floating_point():
            return output.requires_grad_(True)
        return output

    return model.get_input_embeddings().register_forward_hook(hook)
