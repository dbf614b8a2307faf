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

from .capture import Call
from .modules import Block, needs_weights

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


def block_feature(
    block: Block, calls: dict[int, list[Call]], grads: dict[int, list[torch.Tensor]], batch_size: int
) -> Feature:
    """Build the per-example representation of ``block`` from recorded calls and their output gradients.

    Args:
        block: The block, with ``route`` decided.
        calls: Recorded calls per module id.
        grads: Gradient of the summed loss w.r.t. each call's output, aligned with ``calls``.
        batch_size: Number of examples in the micro-batch.
    """
    if block.route == "ghost":
        return _ghost(block, calls, grads)
    sums: dict[int, torch.Tensor] = {}
    device = None
    for _, module in block.modules:
        slots = block.slots[id(module)]
        for call, g in zip(calls.get(id(module), []), grads.get(id(module), []), strict=True):
            device = g.device
            for attr, grad in _materialize_call(module, call, g, set(slots)).items():
                k = slots[attr]
                sums[k] = grad if k not in sums else sums[k] + grad
    parts = []
    for k, shape in enumerate(block.shapes):
        grad = sums.get(k)
        if grad is None:  # parameter unused in this forward: its gradient is zero
            grad = torch.zeros(batch_size, shape.numel(), dtype=ACC, device=device or _any_device(grads))
        parts.append(grad.reshape(batch_size, -1))
    return Materialized(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))


def _any_device(grads: dict[int, list[torch.Tensor]]) -> torch.device:
    """The device activations live on (where features are built), from any recorded output gradient."""
    return next((g.device for gs in grads.values() for g in gs), torch.device("cpu"))


def _ghost(block: Block, calls: dict[int, list[Call]], grads: dict[int, list[torch.Tensor]]) -> Ghost:
    ((_, module),) = block.modules
    a_parts, g_parts = [], []
    for call, g in zip(calls.get(id(module), []), grads[id(module)], strict=True):
        g = g.to(ACC)
        if block.kind == "embedding":
            ids = call.inputs
            if module.padding_idx is not None:  # PyTorch gives the padding row no gradient
                g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
            a_parts.append(ids)
        else:
            a = call.inputs.to(ACC)
            if module.bias is not None and "bias" in block.tracked(module):
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            a_parts.append(a.reshape(a.shape[0], -1, a.shape[-1]))
        g_parts.append(g.reshape(g.shape[0], -1, g.shape[-1]))
    # Several calls of one module in a forward are more tokens of the same sum: concatenate along T.
    return Ghost(torch.cat(a_parts, dim=1), torch.cat(g_parts, dim=1))


def _materialize_call(module: nn.Module, call: Call, g: torch.Tensor, tracked: set[str]) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``module``'s tracked parameters (by attribute name) for one call, each of shape
    ``(B, *param.shape)``."""
    out: dict[str, torch.Tensor] = {}
    g = g.to(ACC)
    if isinstance(module, nn.Linear):
        a = call.inputs.to(ACC)
        a3, g3 = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        if "weight" in tracked:
            out["weight"] = torch.einsum("bto,bti->boi", g3, a3)
        if module.bias is not None and "bias" in tracked:
            out["bias"] = g3.sum(1)
        return out
    if not needs_weights(module):  # an embedding: scatter the output gradients into the rows looked up
        ids = call.inputs.reshape(call.inputs.shape[0], -1)
        g3 = g.reshape(g.shape[0], -1, g.shape[-1])
        if module.padding_idx is not None:
            g3 = g3.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
        weight = torch.zeros(ids.shape[0], module.num_embeddings, module.embedding_dim, dtype=ACC, device=g.device)
        weight.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, g3.shape[-1]), g3)
        out["weight"] = weight
        return out
    return _materialize_generic(module, call, g, tracked)


def _materialize_generic(module: nn.Module, call: Call, g: torch.Tensor, tracked: set[str]) -> dict[str, torch.Tensor]:
    """Any module: a vector-Jacobian product of the module alone, per example.

    Used for norm layers and other small modules with their own parameters. The module's forward is replayed
    on the recorded input (so only modules whose output depends on their first positional input qualify), with
    the parameter values recorded during the real forward (``call.params``), vectorized over examples with
    ``torch.func.vmap``; modules vmap cannot handle are replayed one example at a time.

    The replay calls ``forward`` on a hook-free shallow copy of the module: the module's own hooks (the capture's,
    and FSDP's or ZeRO-3's, which would gather or release parameters) must not run for it.
    """
    names = sorted(tracked)
    missing = [n for n in names if n not in call.params]
    if missing:
        raise RuntimeError(f"No recorded value of {type(module).__name__}.{missing[0]} for its per-example gradient.")
    params = {n: call.params[n] for n in names}

    def vjp_one(x: torch.Tensor, g_x: torch.Tensor) -> dict[str, torch.Tensor]:
        y, pullback = torch.func.vjp(lambda p: _replay(module, p, x.unsqueeze(0)), params)
        if y.shape[1:] != g_x.shape:
            raise NotImplementedError(
                f"Cannot replay {type(module).__name__} for per-example gradients (output shape changed); "
                "exclude its parameters with param_filter."
            )
        return pullback(g_x.unsqueeze(0).to(y.dtype))[0]

    with torch.enable_grad():
        try:
            grads = torch.func.vmap(vjp_one)(call.inputs, g)
        except NotImplementedError:
            raise
        except Exception:  # an op without a batching rule: same products, one example at a time
            rows = [vjp_one(call.inputs[i], g[i]) for i in range(call.inputs.shape[0])]
            grads = {n: torch.stack([r[n] for r in rows]) for n in names}
    return {n: grads[n].to(ACC) for n in names}


def _replay(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``module.forward(x)`` with ``params`` in place of its parameters, without running any module hook."""
    twin = object.__new__(type(module))
    twin.__dict__.update(module.__dict__)  # shares buffers, submodules and settings ...
    twin.__dict__["_parameters"] = {**module._parameters, **params}  # ... but not the parameter dict
    return twin.forward(x)


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


def select(feature: Feature, index: torch.Tensor) -> Feature:
    """Rows ``index`` of a feature."""
    if isinstance(feature, Materialized):
        return Materialized(feature.vec[index])
    return Ghost(feature.a[index], feature.g[index])


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
