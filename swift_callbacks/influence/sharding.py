"""What the engine needs to know about parameter sharding: FSDP2, FSDP1 and DeepSpeed ZeRO-3.

The engine never reads parameter *values* between forwards, where a sharded parameter holds only this rank's
piece: per-example gradients are built from activations and output gradients captured by hooks, and the few
modules whose gradients need their weights (norm layers) get them from a snapshot taken inside their forward,
where every sharding scheme has gathered them. What it does need outside a forward:

* the global shape of each tracked parameter (for routing, memory estimates and the zero gradient of a parameter
  a forward did not use);
* that the forward goes through the module that gathers parameters (the FSDP1 root wrapper);
* that gradient reduction is off while it differentiates (FSDP2 runs its post-backward for every group).

How each scheme stores a parameter outside a forward, as read from the installed sources:

* FSDP2 (``fully_shard``): an ``nn.Parameter`` wrapping a sharded ``DTensor``; ``.shape`` and ``.numel()`` are
  global. Inside the forward of the ``fully_shard``-ed ancestor the module attribute is swapped for a plain
  unsharded ``Parameter`` (another object), and swapped back after forward/backward.
* FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``): the original parameters are 1-D views of this
  rank's slice of a ``FlatParameter`` (size 0 on ranks that hold none of it); the global shapes live in the flat
  parameter's ``_param_infos``/``_shared_param_infos`` and ``_shapes``. With ``use_orig_params=False`` modules do
  not own their parameters at all.
* DeepSpeed ZeRO-3: ``param.data`` is an empty tensor; ``ds_shape``/``ds_numel`` hold the real size
  (``deepspeed/runtime/zero/partition_parameters.py``). Hooks registered by ZeRO-3 gather a module's parameters
  in a forward pre-hook and release them in its forward hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# Wrapper prefixes that FSDP1 (``_fsdp_wrapped_module.``), activation-checkpoint wrappers
# (``_checkpoint_wrapped_module.``) and ``torch.compile`` (``_orig_mod.``) insert into parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

ShapeKey = tuple[int, str]  # (id(module), attribute name)


def clean_name(name: str) -> str:
    """A parameter or module name without wrapper prefixes, as the user wrote the model."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _fsdp1_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return None
    return FullyShardedDataParallel


def check_model(model: nn.Module) -> None:
    """Refuse sharded models the engine cannot follow, with the fix in the message.

    Raises:
        ValueError: FSDP1 with ``use_orig_params=False`` (modules do not own their parameters), or FSDP1 wrappers
            inside a model that is not itself the FSDP1 root (the forward would skip the root's all-gather).
    """
    fsdp1 = _fsdp1_class()
    if fsdp1 is None:
        return
    wrappers = [m for m in model.modules() if isinstance(m, fsdp1)]
    if not wrappers:
        return
    if not all(getattr(w, "_use_orig_params", True) for w in wrappers):
        raise ValueError(
            "FSDP1 with use_orig_params=False hides the model's parameters in flat buffers; per-layer influence needs "
            "use_orig_params=True (Trainer: fsdp_config={'use_orig_params': True}, the transformers default)."
        )
    if not isinstance(model, fsdp1):
        raise ValueError(
            "The model contains FSDP1 (FullyShardedDataParallel) wrappers but is not itself the FSDP1 root, so its "
            "forward would not gather the root's parameters. Pass the wrapped model (trainer.model_wrapped)."
        )


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is managed by FSDP1, FSDP2 (``DTensor``) or ZeRO-3."""
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") or _is_dtensor(p) for p in model.parameters())


def is_zero3(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DeepSpeed ZeRO-3 partitioned (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def fsdp1_shapes(model: nn.Module) -> dict[ShapeKey, torch.Size]:
    """Global shapes of every FSDP1-managed original parameter, by ``(id(module), attribute name)``.

    Empty for a model without FSDP1. Reads the flat parameters' metadata (private to FSDP1 but unchanged since
    ``use_orig_params`` was introduced); shared parameters appear once per module that uses them.
    """
    fsdp1 = _fsdp1_class()
    shapes: dict[ShapeKey, torch.Size] = {}
    if fsdp1 is None:
        return shapes
    for wrapper in model.modules():
        handle = getattr(wrapper, "_handle", None) if isinstance(wrapper, fsdp1) else None
        if handle is None:
            continue
        flat = handle.flat_param
        for info, shape in zip(flat._param_infos, flat._shapes, strict=True):
            shapes[(id(info.module), info.param_name)] = torch.Size(shape)
        for info in flat._shared_param_infos:
            shapes[(id(info.module), info.param_name)] = shapes[(id(info.prim_module), info.prim_param_name)]
    return shapes


def global_shape(p: torch.Tensor, module: nn.Module, attr: str, fsdp1: dict[ShapeKey, torch.Size]) -> torch.Size:
    """The unsharded shape of parameter ``p`` = ``module.<attr>``, whatever the sharding.

    Args:
        p: The parameter as seen outside a forward.
        module: The module that owns it.
        attr: Its attribute name in ``module``.
        fsdp1: ``fsdp1_shapes(model)``.
    """
    if hasattr(p, "ds_shape"):  # DeepSpeed ZeRO-3: p itself is empty
        return torch.Size(p.ds_shape)
    if (id(module), attr) in fsdp1:  # FSDP1: p is a 1-D slice of a flat parameter
        return fsdp1[(id(module), attr)]
    return p.shape  # plain tensors, and DTensor (FSDP2) whose .shape is global


def full_value(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """A parameter value read inside its module's forward, as a plain detached tensor.

    Inside a forward every scheme above has gathered the parameter, but the storage is released right after
    (FSDP frees the all-gather buffer, ZeRO-3 empties ``param.data``): pass ``copy=True`` for a sharded model.
    An unsharded parameter outlives the pass and needs no copy. A ``DTensor`` seen here (a module under tensor
    parallelism, or not covered by any ``fully_shard``) is gathered with ``full_tensor()``, a collective: it runs
    once per forward call of the module on every rank, and every rank runs the same forwards (see
    ``distributed.shard``).
    """
    t = t.detach()
    if _is_dtensor(t):
        return t.full_tensor()
    return t.clone() if copy else t


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _fsdp2_param_groups(model: nn.Module) -> list:
    """The FSDP2 parameter groups under ``model`` (empty without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    groups = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        found = getattr(state, "_fsdp_param_groups", None)
        if found is None:  # torch < 2.10 kept a single optional group
            single = getattr(state, "_fsdp_param_group", None)
            found = [single] if single is not None else []
        groups.extend(found)
    return groups


@contextlib.contextmanager
def no_gradient_reduction(model: nn.Module) -> Iterator[None]:
    """Keep FSDP2 from reducing gradients during the tracking pass; restore the previous setting after.

    FSDP2 runs every group's post-backward at the end of any backward, including ``torch.autograd.grad`` on
    layer outputs. There are no parameter gradients then, so normally nothing is reduced, but with
    ``set_reduce_scatter_unused_params(True)``, or gradients accumulated without sync, the post-backward would
    reduce-scatter into the sharded ``.grad``. With reduction off it only reshards. (FSDP1 and ZeRO-3 reduce in
    hooks on the parameters' gradient accumulators, which ``autograd.grad`` on outputs never runs.)
    """
    groups = _fsdp2_param_groups(model)
    saved = [g.reduce_grads for g in groups]
    for g in groups:
        g.reduce_grads = False
    try:
        yield
    finally:
        for g, value in zip(groups, saved, strict=True):
            g.reduce_grads = value
