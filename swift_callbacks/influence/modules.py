"""Which parameters are tracked, grouped into blocks whose per-example gradients are computed jointly.

A *block* is the unit of the engine's bookkeeping. Most blocks are one module with its own trainable
parameters (a `Linear`, an `Embedding`, a norm layer). A parameter shared by several modules (tied input and
output embeddings) forms a single block that sums every module's contribution, so the inner products are those
of the true gradient of the shared tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import UserError
from . import sharding

ParamFilter = Callable[[str], bool] | str | None
BlockKind = Literal["linear", "embedding", "generic", "shared"]
Rule = Literal["linear", "embedding", "generic"]


class UnsupportedModelError(UserError):
    """The model uses a tracked parameter in a way whose per-example gradient the engine cannot recover.

    The message names the module or parameter and the way out (usually ``param_filter``).
    """


def rule(module: nn.Module) -> Rule:
    """How the per-example gradients of ``module``'s own parameters are computed.

    Decided by what the module *runs*, not by its type: only a module whose forward is exactly
    ``nn.Linear.forward`` (``y = x Wᵀ + b``) or ``nn.Embedding.forward`` without ``max_norm`` (a row lookup; one
    with ``scale_grad_by_freq`` is refused when blocks are found) gets the closed-form rules (and the ghost
    route). Every other module, including subclasses that override
    ``forward`` (Gemma's scaled word embeddings, OPT's learned positions, GPT-2's ``Conv1D``) or instances whose
    ``forward`` was replaced, is replayed on its recorded arguments (a vector-Jacobian product per example).
    """
    patched = "forward" in module.__dict__
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward and not patched:
        return "linear"
    if isinstance(module, nn.Embedding) and forward is nn.Embedding.forward and not patched and not module.max_norm:
        return "embedding"
    return "generic"


@dataclass
class Block:
    """A group of tracked parameters whose per-example gradients are computed together.

    Parameters are identified by ``(module, attribute name)``, never by tensor identity: FSDP2 swaps a module's
    sharded parameter for an unsharded one (another object) around each forward and backward.

    Attributes:
        name: Qualified name of the (first) module, used in errors and diagnostics.
        kind: ``linear`` and ``embedding`` blocks may use the ghost inner product; ``generic`` and ``shared``
            blocks are always materialized.
        modules: ``(qualified name, module)`` pairs whose forward calls contribute to the block.
        param_names: Qualified names of the tracked parameters, in a fixed order. The block holds no parameter
            tensors: they may be replaced (sharding applied after set-up, FSDP2's swaps), and a stale reference
            would keep a full copy alive.
        shapes: Global (unsharded) shape of each parameter, aligned with ``param_names``.
        slots: For each module (by ``id``), ``{attribute name: index into param_names}`` of its tracked
            parameters.
        route: ``"ghost"`` or ``"materialize"``; set by the engine once token counts are known.
    """

    name: str
    kind: BlockKind
    modules: list[tuple[str, nn.Module]]
    param_names: list[str]
    shapes: list[torch.Size]
    slots: dict[int, dict[str, int]]
    route: str = "materialize"

    @property
    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def current_param(self) -> nn.Parameter:
        """The block's first parameter as its module holds it now."""
        _, module = self.modules[0]
        return get_path(module, next(iter(self.slots[id(module)])))

    def tracked(self, module: nn.Module) -> set[str]:
        """Attribute names of ``module``'s parameters tracked in this block."""
        return set(self.slots.get(id(module), ()))

    @property
    def linear_dims(self) -> tuple[int, int]:
        """(input width including a bias column, output width) of a linear block."""
        module = self.modules[0][1]
        has_bias = module.bias is not None and "bias" in self.tracked(module)
        return module.in_features + int(has_bias), module.out_features


def get_path(module: nn.Module, attr: str) -> torch.Tensor:
    """``module.<attr>`` for a dotted attribute path (a parameter held in a child ``ParameterDict``)."""
    for part in attr.split("."):
        module = getattr(module, part)
    return module


def _compile_filter(param_filter: ParamFilter) -> Callable[[str], bool]:
    if param_filter is None:
        return lambda name: True
    if isinstance(param_filter, str):
        try:
            pattern = re.compile(param_filter)
        except re.error as err:
            raise ValueError(f"param_filter {param_filter!r} is not a valid regular expression: {err}") from err
        return lambda name: pattern.search(name) is not None
    return param_filter


def find_blocks(model: nn.Module, param_filter: ParamFilter = None) -> list[Block]:
    """Find the tracked parameters of ``model`` and group them into blocks.

    Tracked parameters are those with ``requires_grad=True`` whose qualified name passes ``param_filter``
    (a regex searched in the name, or a predicate). For a PEFT LoRA model these are the adapter weights.

    Args:
        model: The model, unwrapped from DDP/DeepSpeed engines; under FSDP1 the root ``FullyShardedDataParallel``
            wrapper (FSDP2 and ZeRO-3 shard in place, so the model itself).
        param_filter: Optional regex or predicate on parameter names, written without wrapper prefixes
            (``_fsdp_wrapped_module.`` and the like are removed before matching).

    Returns:
        Blocks in module registration order.

    Raises:
        ValueError: If no parameter is tracked, or the model is sharded in a way the engine cannot follow
            (see ``sharding.check_model``).
    """
    sharding.check_model(model)
    keep = _compile_filter(param_filter)
    fsdp1 = sharding.fsdp1_shapes(model)
    # Per tracked parameter (by identity, which is stable while nothing runs): its users as
    # (module name, module, attribute name), its qualified name and its global shape.
    users: dict[int, list[tuple[str, nn.Module, str]]] = {}
    names: dict[int, str] = {}
    params: dict[int, nn.Parameter] = {}
    shapes: dict[int, torch.Size] = {}
    all_names: dict[int, list[str]] = {}
    by_name = dict(model.named_modules(remove_duplicate=False))
    for raw_name, module in by_name.items():
        mod_name = sharding.clean_name(raw_name)
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if not p.requires_grad:
                continue
            all_names.setdefault(id(p), []).append(full)
            names.setdefault(id(p), full)
            params[id(p)] = p
            shapes.setdefault(id(p), sharding.global_shape(p, module, p_name, fsdp1))
            user, user_name, attr = module, mod_name, p_name
            if isinstance(module, nn.ParameterDict | nn.ParameterList) and raw_name:
                # A parameter container is never called: the module holding it reads the values in its forward
                # (PEFT's IA3, LoHa, LoKr, LoRA on embeddings). That module is the user, under a dotted path.
                parent_raw, _, child = raw_name.rpartition(".")
                user, user_name, attr = by_name[parent_raw], sharding.clean_name(parent_raw), f"{child}.{p_name}"
            entry = users.setdefault(id(p), [])
            if all(m is not user for _, m, _ in entry):
                entry.append((user_name, user, attr))
    # A tensor is tracked when any of its names passes the filter (tied weights have two), with all its users.
    for pid in [pid for pid, full_names in all_names.items() if not any(keep(n) for n in full_names)]:
        for table in (users, names, params, shapes):
            table.pop(pid, None)
    _reject_unsupported(model, users, names)
    if not params:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad and keep(sharding.clean_name(n))]
        shown = param_filter if isinstance(param_filter, str) or param_filter is None else "the param_filter predicate"
        if frozen and param_filter is not None:
            raise ValueError(
                f"No trainable parameter matched: {shown!r} matches {len(frozen)} parameters (e.g. {frozen[0]!r}), all "
                "frozen (requires_grad=False); influence is taken through the parameters training updates"
            )
        raise ValueError(
            "No trainable parameter matched: the model has no parameter with requires_grad=True"
            + ("" if param_filter is None else f" whose name matches {shown!r}")
            + ". With PEFT, build the trainer first so the adapters exist."
        )

    def block(name: str, kind: BlockKind, pids: list[int]) -> Block:
        slots: dict[int, dict[str, int]] = {}
        modules: list[tuple[str, nn.Module]] = []
        for index, pid in enumerate(pids):
            for mod_name, module, attr in users[pid]:
                if id(module) not in slots:
                    modules.append((mod_name, module))
                slots.setdefault(id(module), {})[attr] = index
        return Block(name, kind, modules, [names[p] for p in pids], [shapes[p] for p in pids], slots)

    sole: dict[int, list[tuple[str, int]]] = {}  # per module, (attribute, parameter) it alone uses
    for pid, mods in users.items():
        if len(mods) == 1:
            sole.setdefault(id(mods[0][1]), []).append((mods[0][2], pid))
    blocks: list[Block] = []
    seen_modules: set[int] = set()
    seen_params: set[int] = set()
    for pid, mods in users.items():
        if pid in seen_params:
            continue
        if len(mods) > 1:  # a shared parameter: one materialized block over all its users
            seen_params.add(pid)
            blocks.append(block(names[pid], "shared", [pid]))
            continue
        mod_name, module, _ = mods[0]
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        own = sole.get(id(module), [])
        seen_params.update(pid for _, pid in own)
        blocks.append(block(mod_name, _kind(module, {attr for attr, _ in own}), [pid for _, pid in own]))
    return blocks


def _kind(module: nn.Module, attrs: set[str]) -> BlockKind:
    module_rule = rule(module)
    if module_rule != "generic" and "weight" in attrs:
        return module_rule
    return "generic"


def _reject_virtual_tokens(model: nn.Module) -> None:
    """PEFT prompt learning that prepends virtual tokens to the input: the logits no longer align with the tokens.

    (Prefix tuning feeds its virtual tokens as attention keys/values instead, keeps one logit row per token, and
    is exact.)
    """
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        kind = str(getattr(config, "peft_type", ""))
        if getattr(config, "is_prompt_learning", False) and "PREFIX" not in kind.upper():
            raise UnsupportedModelError(
                f"PEFT adapter {name!r} ({kind.split('.')[-1]}) prepends virtual tokens to every input, so the "
                "model's logits no longer line up with the example's tokens and per-token losses cannot be matched. "
                "Influence supports LoRA and prefix tuning; track this model without the prompt-learning adapter."
            )


def _reject_unsupported(model: nn.Module, users: dict, names: dict) -> None:
    """Raise for tracked parameters whose per-example gradients cannot be recovered from module calls."""
    _reject_virtual_tokens(model)
    for name, module in model.named_modules():
        if type(module).__name__ == "ParamWrapper" and type(module).__module__.startswith("peft."):
            adapters = [n for n, p in module.named_parameters() if p.requires_grad and id(p) in users]
            if adapters:
                raise UnsupportedModelError(
                    f"{sharding.clean_name(name)!r} is a PEFT LoRA on a parameter (target_parameters): it reads "
                    "its adapter weights directly, without calling a module, so their per-example gradients cannot "
                    "be captured. Use target_modules instead, or exclude these adapters with param_filter."
                )
        if (
            isinstance(module, nn.Embedding)
            and module.scale_grad_by_freq
            and any(p.requires_grad and id(p) in users for p in module.parameters(recurse=False))
        ):
            raise UnsupportedModelError(
                f"Embedding {sharding.clean_name(name)!r} has scale_grad_by_freq=True: its gradient is divided by "
                "each token's count over the whole batch, so examples' gradients are not separable. Exclude it with "
                "param_filter, or set scale_grad_by_freq=False."
            )
        magnitude = getattr(module, "lora_magnitude_vector", None)
        if isinstance(magnitude, nn.ModuleDict) and len(magnitude) > 0:
            raise UnsupportedModelError(
                f"{sharding.clean_name(name)!r} is a DoRA adapter (use_dora=True); DoRA's weight normalisation is not "
                "supported by the per-example gradient engine. Use plain LoRA."
            )
