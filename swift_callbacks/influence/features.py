"""Per-example gradient representations of one block and their exact inner products.

Two representations, both exact:

* ``Materialized``: the flattened per-example gradient, shape ``(n, D)``.
* ``Ghost``: per-token factors of a linear map's gradient. For ``∇W_i = Σ_t g_it a_itᵀ``,
  ``<∇W_i, ∇W_j> = Σ_{t,s} (a_it·a_js)(g_it·g_js)``; an embedding is the special case where ``a`` is a one-hot
  token id, so ``a_it·a_js = [x_it == x_js]``.

Everything here is computed in float32 whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .capture import Call, Layout
from .modules import Block, UnsupportedModelError, rule

ACC = torch.float32
# Upper bound on the elements of one intermediate (n_x, n_y, T_x, T_y) ghost kernel before chunking.
_GHOST_CHUNK_ELEMENTS = 1 << 25


@dataclass
class Materialized:
    vec: torch.Tensor  # (n, D)

    def __len__(self) -> int:
        return self.vec.shape[0]

    def nbytes(self) -> int:
        return self.vec.numel() * self.vec.element_size()


@dataclass
class Ghost:
    a: torch.Tensor  # (n, T, d_in) float, or (n, T) token ids for an embedding
    g: torch.Tensor  # (n, T, d_out)

    def __len__(self) -> int:
        return self.g.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.g))


Feature = Materialized | Ghost


# ---------------------------------------------------------------------------------------------- building


def block_feature(block: Block, calls: dict[int, list[Call]], batch_size: int, width: int) -> Feature:
    """Build the per-example representation of ``block`` from recorded calls (with their output gradients set).

    Args:
        block: The block, with ``route`` decided.
        calls: Recorded calls per module id, each with ``grads`` set.
        batch_size: Number of examples in the micro-batch.
        width: Padded width of the micro-batch.
    """
    if block.route == "ghost":
        return _ghost(block, calls, batch_size, width)
    sums: dict[int, torch.Tensor] = {}
    device = None
    for _, module in block.modules:
        slots = block.slots[id(module)]
        for call in calls.get(id(module), []):
            device = call.grads[0].device
            for attr, grad in _materialize_call(module, call, set(slots), batch_size, width).items():
                k = slots[attr]
                sums[k] = grad if k not in sums else sums[k] + grad
    parts = []
    for k, shape in enumerate(block.shapes):
        grad = sums.get(k)
        if grad is None:  # parameter unused in this forward (the verification checks that this is true)
            grad = torch.zeros(batch_size, shape.numel(), dtype=ACC, device=device or _any_device(calls))
        parts.append(grad.reshape(batch_size, -1))
    return Materialized(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))


def _any_device(calls: dict[int, list[Call]]) -> torch.device:
    """The device activations live on (where features are built), from any recorded output gradient."""
    return next((c.grads[0].device for cs in calls.values() for c in cs), torch.device("cpu"))


def _ghost(block: Block, calls: dict[int, list[Call]], batch_size: int, width: int) -> Ghost:
    ((_, module),) = block.modules
    a_parts, g_parts = [], []
    for call in calls.get(id(module), []):
        g = call.grads[0].to(ACC)
        inputs = call.per_example_input(batch_size, width)
        if block.kind == "embedding":
            if module.padding_idx is not None:  # PyTorch gives the padding row no gradient
                g = g.masked_fill((inputs == module.padding_idx).unsqueeze(-1), 0.0)
            a_parts.append(inputs.reshape(batch_size, -1))
        else:
            a = inputs.to(ACC)
            if module.bias is not None and "bias" in block.tracked(module):
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            a_parts.append(a.reshape(batch_size, -1, a.shape[-1]))
        g_parts.append(g.reshape(batch_size, -1, g.shape[-1]))
    if not g_parts:  # the module was not called: a zero gradient, which the verification checks
        d_in, d_out = block.linear_dims if block.kind == "linear" else (0, module.embedding_dim)
        device = _any_device(calls)
        a = torch.zeros(batch_size, 1, dtype=torch.long, device=device) if block.kind == "embedding" else None
        return Ghost(a if a is not None else torch.zeros(batch_size, 1, d_in, device=device),
                     torch.zeros(batch_size, 1, d_out, device=device))  # fmt: skip
    # Several calls of one module in a forward are more tokens of the same sum: concatenate along T.
    return Ghost(torch.cat(a_parts, dim=1), torch.cat(g_parts, dim=1))


def _materialize_call(
    module: nn.Module, call: Call, tracked: set[str], batch_size: int, width: int
) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``module``'s tracked parameters (by attribute name) for one call, each of shape
    ``(B, *param.shape)``."""
    module_rule = rule(module)
    if module_rule == "generic":
        return _materialize_generic(module, call, tracked, batch_size)
    out: dict[str, torch.Tensor] = {}
    g = call.grads[0].to(ACC)
    inputs = call.per_example_input(batch_size, width)
    if module_rule == "linear":
        a = inputs.to(ACC)
        a3, g3 = a.reshape(batch_size, -1, a.shape[-1]), g.reshape(batch_size, -1, g.shape[-1])
        if "weight" in tracked:
            out["weight"] = torch.einsum("bto,bti->boi", g3, a3)
        if module.bias is not None and "bias" in tracked:
            out["bias"] = g3.sum(1)
        return out
    # An exact nn.Embedding: scatter the output gradients into the rows looked up.
    ids = inputs.reshape(batch_size, -1)
    g3 = g.reshape(batch_size, -1, g.shape[-1])
    if module.padding_idx is not None:
        g3 = g3.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
    weight = torch.zeros(batch_size, module.num_embeddings, module.embedding_dim, dtype=ACC, device=g.device)
    weight.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, g3.shape[-1]), g3)
    out["weight"] = weight
    return out


def _materialize_generic(module: nn.Module, call: Call, tracked: set[str], batch_size: int) -> dict[str, torch.Tensor]:
    """Any module: a vector-Jacobian product of the module alone, per example.

    The module's forward is replayed on its recorded arguments, example by example, with the parameter values
    recorded during the real forward (``call.params``), vectorized over examples with ``torch.func.vmap`` (modules
    vmap cannot handle, such as routed experts with data-dependent control flow, are replayed one example at a
    time). Arguments that carry the example axis are sliced per example (``FLAT`` ones keep their flattened
    layout); shared arguments are passed whole. Whether the replay reproduces the real computation is checked by
    the engine's verification, not assumed.

    The replay calls ``forward`` on a hook-free shallow copy of the module: the module's own hooks (the capture's,
    and FSDP's or ZeRO-3's, which would gather or release parameters) must not run for it.
    """
    names = sorted(tracked)
    missing = [n for n in names if n not in call.params]
    if missing:
        raise RuntimeError(f"No recorded value of {type(module).__name__}.{missing[0]} for its per-example gradient.")
    params = {n: call.params[n] for n in names}
    leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
    per_example = [i for i, layout in call.layouts.items() if layout is not Layout.SHARED]
    flat_in = {i for i, layout in call.layouts.items() if layout is Layout.FLAT}
    flat_out = [layout is Layout.FLAT for layout in call.out_layouts]

    def call_args(xs: list[torch.Tensor]) -> tuple[tuple, dict]:
        args = list(leaves)
        for i, x in zip(per_example, xs, strict=True):
            args[i] = x if i in flat_in else x.unsqueeze(0)
        return pytree.tree_unflatten(args, spec)

    def forward(p: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        a, kw = call_args(xs)
        device_type, enabled, dtype = call.autocast
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):  # the precision the call ran in
            out_leaves = pytree.tree_leaves(_replay(module, p, a, kw))
        return tuple(out_leaves[i] for i in call.out_index)

    def cotangents(ys: tuple[torch.Tensor, ...], gs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = []
        for y, g, flat in zip(ys, gs, flat_out, strict=True):
            g = g if flat else g.unsqueeze(0)  # a FLAT output's per-example slice is already (T, ...)
            if y.shape != g.shape:
                raise UnsupportedModelError(
                    f"Replaying {type(module).__name__} on one example gave an output of shape {tuple(y.shape)}, "
                    f"not {tuple(g.shape)}; its per-example gradients cannot be computed. Exclude its parameters "
                    "with param_filter."
                )
            out.append(g.to(y.dtype))
        return tuple(out)

    def vjp_one(xs: list[torch.Tensor], gs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ys, pullback = torch.func.vjp(lambda p: forward(p, xs), params)
        return pullback(cotangents(ys, gs))[0]

    def autograd_one(xs: list[torch.Tensor], gs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        # Plain autograd: works for custom autograd.Functions that functorch cannot transform (PEFT's LoHa).
        leaves_p = {n: t.detach().requires_grad_(True) for n, t in params.items()}
        ys = forward(leaves_p, xs)
        grads = torch.autograd.grad(ys, list(leaves_p.values()), cotangents(ys, gs), allow_unused=True)
        return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves_p.items(), grads, strict=True)}

    xs = [leaves[i].reshape(batch_size, -1, *leaves[i].shape[1:]) if i in flat_in else leaves[i] for i in per_example]
    gs = list(call.grads)
    with torch.enable_grad():
        try:
            grads = torch.func.vmap(vjp_one)(xs, gs)
        except UnsupportedModelError:
            raise
        except Exception:  # no batching rule, data-dependent control flow, custom autograd: one example at a time
            rows = [autograd_one([x[i] for x in xs], [g[i] for g in gs]) for i in range(batch_size)]
            grads = {n: torch.stack([r[n] for r in rows]) for n in names}
    return {n: grads[n].to(ACC) for n in names}


def _replay(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict):
    """``module.forward(*args, **kwargs)`` with ``params`` in place of its parameters, without the module's hooks.

    ``params`` may hold dotted paths into child containers (``"lora_embedding_A.default"``).
    """
    return _twin(module, params).forward(*args, **kwargs)


def _twin(module: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of ``module`` whose parameters (and those of the children on dotted paths) are ``params``."""
    twin = object.__new__(type(module))
    twin.__dict__.update(module.__dict__)  # shares buffers, submodules and settings ...
    direct = {k: v for k, v in params.items() if "." not in k}
    twin.__dict__["_parameters"] = {**module._parameters, **direct}  # ... but not the parameter dict
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in params.items():
        if "." in key:
            child, _, rest = key.partition(".")
            nested.setdefault(child, {})[rest] = value
    if nested:
        twin.__dict__["_modules"] = {
            **module._modules,
            **{c: _twin(module._modules[c], sub) for c, sub in nested.items()},
        }
    return twin


# ------------------------------------------------------------------------------------------ combining


def concat(features: Sequence[Feature]) -> Feature:
    """Concatenate per-micro-batch features of one block along the example axis (zero-padding T)."""
    first = features[0]
    if isinstance(first, Materialized):
        return Materialized(torch.cat([f.vec for f in features]))
    t_max = max(f.g.shape[1] for f in features)
    return Ghost(
        torch.cat([_pad_t(f.a, t_max) for f in features]),
        torch.cat([_pad_t(f.g, t_max) for f in features]),
    )


def _pad_t(x: torch.Tensor, t: int) -> torch.Tensor:
    extra = t - x.shape[1]
    if extra == 0:
        return x
    pad = (0, 0, 0, extra) if x.dim() == 3 else (0, extra)
    return F.pad(x, pad)


def to(feature: Feature, device: torch.device | str) -> Feature:
    if isinstance(feature, Materialized):
        return Materialized(feature.vec.to(device))
    return Ghost(feature.a.to(device), feature.g.to(device))


# -------------------------------------------------------------------------------------- inner products


def pairwise(x: Feature, y: Feature) -> torch.Tensor:
    """Inner products ``<∇_i, ∇_j>`` for every row i of ``x`` and j of ``y``: shape ``(len(x), len(y))``."""
    if isinstance(x, Materialized):
        return x.vec @ y.vec.to(x.vec.device).T
    y = to(y, x.g.device)
    out = torch.empty(len(x), len(y), dtype=ACC, device=x.g.device)
    per_y = max(1, _GHOST_CHUNK_ELEMENTS // max(1, len(x) * x.g.shape[1] * y.g.shape[1]))
    for start in range(0, len(y), per_y):
        stop = min(start + per_y, len(y))
        out[:, start:stop] = _ghost_block(x, Ghost(y.a[start:stop], y.g[start:stop]))
    return out


def _ghost_block(x: Ghost, y: Ghost) -> torch.Tensor:
    kg = torch.einsum("xtd,ysd->xyts", x.g, y.g)
    if x.a.dim() == 2:  # token ids: one-hot inner products
        ka = (x.a[:, None, :, None] == y.a[None, :, None, :]).to(ACC)
    else:
        ka = torch.einsum("xtd,ysd->xyts", x.a, y.a)
    return (ka * kg).sum(dim=(2, 3))


def sq_norms(x: Feature) -> torch.Tensor:
    """Squared gradient norms ``<∇_i, ∇_i>``, shape ``(len(x),)``."""
    if isinstance(x, Materialized):
        return (x.vec * x.vec).sum(1)
    kg = torch.bmm(x.g, x.g.transpose(1, 2))
    ka = (x.a[:, :, None] == x.a[:, None, :]).to(ACC) if x.a.dim() == 2 else torch.bmm(x.a, x.a.transpose(1, 2))
    return (ka * kg).sum(dim=(1, 2))
