"""Which parameters are tracked, grouped into blocks whose per-example gradients are computed jointly.

A *block* is the unit of the engine's bookkeeping. Most blocks are one module with its own trainable
parameters (a `Linear`, an `Embedding`, a norm layer). A parameter shared by several modules (tied input and
output embeddings) forms a single block that sums every module's contribution, so the inner products are those
of the true gradient of the shared tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

ParamFilter = Callable[[str], bool] | str | None
BlockKind = Literal["linear", "embedding", "generic", "shared"]


@dataclass
class Block:
    """A group of tracked parameters whose per-example gradients are computed together.

    Attributes:
        name: Qualified name of the (first) module, used in errors and diagnostics.
        kind: ``linear`` and ``embedding`` blocks may use the ghost inner product; ``generic`` and ``shared``
            blocks are always materialized.
        modules: ``(qualified name, module)`` pairs whose forward calls contribute to the block.
        params: ``(qualified name, parameter)`` pairs, in a fixed order.
        route: ``"ghost"`` or ``"materialize"``; set by the engine once token counts are known.
    """

    name: str
    kind: BlockKind
    modules: list[tuple[str, nn.Module]]
    params: list[tuple[str, nn.Parameter]]
    route: str = "materialize"
    tracked_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.tracked_ids = {id(p) for _, p in self.params}

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    @property
    def linear_dims(self) -> tuple[int, int]:
        """(input width including a bias column, output width) of a linear block."""
        module = self.modules[0][1]
        has_bias = module.bias is not None and id(module.bias) in self.tracked_ids
        return module.in_features + int(has_bias), module.out_features


def _compile_filter(param_filter: ParamFilter) -> Callable[[str], bool]:
    if param_filter is None:
        return lambda name: True
    if isinstance(param_filter, str):
        pattern = re.compile(param_filter)
        return lambda name: pattern.search(name) is not None
    return param_filter


def find_blocks(model: nn.Module, param_filter: ParamFilter = None) -> list[Block]:
    """Find the tracked parameters of ``model`` and group them into blocks.

    Tracked parameters are those with ``requires_grad=True`` whose qualified name passes ``param_filter``
    (a regex searched in the name, or a predicate). For a PEFT LoRA model these are the adapter weights.

    Args:
        model: The model, unwrapped from DDP/DeepSpeed engines.
        param_filter: Optional regex or predicate on parameter names.

    Returns:
        Blocks in module registration order.

    Raises:
        ValueError: If no parameter is tracked.
    """
    keep = _compile_filter(param_filter)
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    names: dict[int, str] = {}
    params: dict[int, nn.Parameter] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if not p.requires_grad or not keep(full):
                continue
            names.setdefault(id(p), full)
            params[id(p)] = p
            entry = users.setdefault(id(p), [])
            if all(m is not module for _, m in entry):
                entry.append((mod_name, module))
    if not params:
        raise ValueError(
            "No trainable parameter matched: the model has no parameter with requires_grad=True"
            + ("" if param_filter is None else f" whose name matches {param_filter!r}")
            + ". With PEFT, build the trainer first so the adapters exist."
        )
    blocks: list[Block] = []
    seen_modules: set[int] = set()
    seen_params: set[int] = set()
    for pid, mods in users.items():
        if pid in seen_params:
            continue
        if len(mods) > 1:  # a shared parameter: one materialized block over all its users
            group = [pid]
            seen_params.add(pid)
            blocks.append(Block(names[pid], "shared", mods, [(names[pid], params[pid])]))
            continue
        mod_name, module = mods[0]
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        own = [
            (names[id(p)], p)
            for _, p in module.named_parameters(recurse=False)
            if id(p) in params and len(users[id(p)]) == 1
        ]
        group = [id(p) for _, p in own]
        seen_params.update(group)
        blocks.append(Block(mod_name, _kind(module, own), [(mod_name, module)], own))
    return blocks


def _kind(module: nn.Module, own: list[tuple[str, nn.Parameter]]) -> BlockKind:
    ids = {id(p) for _, p in own}
    if isinstance(module, nn.Linear) and id(module.weight) in ids:
        return "linear"
    if isinstance(module, nn.Embedding) and id(module.weight) in ids:
        return "embedding"
    return "generic"
