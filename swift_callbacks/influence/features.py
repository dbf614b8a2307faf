"""Per-example gradient representations of one block and their exact inner products.

Two representations, both exact:

* ``Materialized``: the flattened per-example gradient, shape ``(n, D)``.
* ``Ghost``: per-token factors of a linear map's gradient. For ``∇W_i = Σ_t g_it a_itᵀ``,
  ``<∇W_i, ∇W_j> = Σ_{t,s} (a_it·a_js)(g_it·g_js)``; an embedding is the special case where ``a`` is a one-hot
  token id, so ``a_it·a_js = [x_it == x_js]``: its products sum, over the ids both examples looked up, the dot
  products of their summed output gradients (rows matched by id, never a ``vocab x d`` tensor per example).

Everything here is computed in float32 whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
    # Token-id features: their rows (see ``_rows``), built at the first product and kept (an evaluation feature
    # takes part in one product per probe group).
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.g.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.g))


Feature = Materialized | Ghost


# ---------------------------------------------------------------------------------------------- building


def block_feature(
    block: Block,
    calls: dict[int, list[Call]],
    batch_size: int,
    width: int,
    out: torch.Tensor | None = None,
    verdicts: ReplayVerdicts | None = None,
) -> Feature:
    """Build the per-example representation of ``block`` from recorded calls (with their output gradients set).

    Args:
        block: The block, with ``route`` decided.
        calls: Recorded calls per module id, each with ``grads`` set.
        batch_size: Number of examples in the micro-batch.
        width: Padded width of the micro-batch.
        out: For a materialized block, a contiguous ``(batch_size, block.numel)`` float32 tensor to build the
            feature in (the rows of a :class:`Rows` buffer), so it is written once into its final place.
        verdicts: Where generic modules may use the batched replay (None: the per-example replay always, as the
            verification uses it).
    """
    if block.route == "ghost":
        return _ghost(block, calls, batch_size, width)
    block_calls = [(module, call) for _, module in block.modules for call in calls.get(id(module), [])]
    if out is not None and len(block.shapes) == 1 and len(block_calls) == 1:
        # The common case (one parameter, one call): the closed form writes straight into ``out``.
        module, call = block_calls[0]
        (attr,) = block.slots[id(module)]
        grad = _materialize_call(module, call, {attr}, batch_size, width, out, verdicts)[attr]
        if grad.data_ptr() != out.data_ptr():
            out.copy_(grad.reshape(batch_size, -1))
        return Materialized(out)
    sums: dict[int, torch.Tensor] = {}
    for module, call in block_calls:
        slots = block.slots[id(module)]
        for attr, grad in _materialize_call(module, call, set(slots), batch_size, width, None, verdicts).items():
            k = slots[attr]
            sums[k] = grad if k not in sums else sums[k] + grad
    device = block_calls[0][1].grads[0].device if block_calls else _any_device(calls)
    parts = []
    for k, shape in enumerate(block.shapes):
        grad = sums.get(k)
        if grad is None:  # parameter unused in this forward (the verification checks that this is true)
            grad = torch.zeros(batch_size, shape.numel(), dtype=ACC, device=device)
        parts.append(grad.reshape(batch_size, -1))
    if out is not None:
        torch.cat(parts, dim=1, out=out) if len(parts) > 1 else out.copy_(parts[0])
        return Materialized(out)
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
    module: nn.Module,
    call: Call,
    tracked: set[str],
    batch_size: int,
    width: int,
    out: torch.Tensor | None = None,
    verdicts: ReplayVerdicts | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``module``'s tracked parameters (by attribute name) for one call, each of shape
    ``(B, *param.shape)`` (a linear weight written into ``out`` when given)."""
    module_rule = rule(module)
    if module_rule == "generic":
        return _materialize_generic(module, call, tracked, batch_size, verdicts)
    grads: dict[str, torch.Tensor] = {}
    g = call.grads[0].to(ACC)
    inputs = call.per_example_input(batch_size, width)
    if module_rule == "linear":
        a = inputs.to(ACC)
        a3, g3 = a.reshape(batch_size, -1, a.shape[-1]), g.reshape(batch_size, -1, g.shape[-1])
        if "weight" in tracked:
            # bmm: a quarter faster than the equivalent einsum on CPU.
            dest = None if out is None else out.view(batch_size, g3.shape[-1], a3.shape[-1])
            grads["weight"] = torch.bmm(g3.transpose(1, 2), a3, out=dest)
        if module.bias is not None and "bias" in tracked:
            grads["bias"] = g3.sum(1)
        return grads
    # An exact nn.Embedding: scatter the output gradients into the rows looked up.
    ids = inputs.reshape(batch_size, -1)
    g3 = g.reshape(batch_size, -1, g.shape[-1])
    if module.padding_idx is not None:
        g3 = g3.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0.0)
    shape = (batch_size, module.num_embeddings, module.embedding_dim)
    weight = torch.zeros(shape, dtype=ACC, device=g.device) if out is None else out.view(shape).zero_()
    weight.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, g3.shape[-1]), g3)
    grads["weight"] = weight
    return grads


def _materialize_generic(
    module: nn.Module, call: Call, tracked: set[str], batch_size: int, verdicts: ReplayVerdicts | None = None
) -> dict[str, torch.Tensor]:
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
    if verdicts is not None and verdicts.get(module, tracked):
        fast = _broadcast_replay(module, call, params, batch_size)
        if fast is not None:
            return fast
    with torch.enable_grad():
        try:
            grads = torch.func.vmap(vjp_one)(xs, gs)
        except UnsupportedModelError:
            raise
        except Exception:  # no batching rule, data-dependent control flow, custom autograd: one example at a time
            rows = [autograd_one([x[i] for x in xs], [g[i] for g in gs]) for i in range(batch_size)]
            grads = {n: torch.stack([r[n] for r in rows]) for n in names}
    slow = {n: grads[n].to(ACC) for n in names}
    if verdicts is not None:
        verdicts.judge(module, call, params, batch_size, slow)
    return slow


# A module whose parameters enter its output elementwise (norm scales and biases, ...) can get its per-example
# gradients from ONE batched replay in which each parameter is expanded to one copy per example, ``(B, 1.., *S)``:
# autograd's gradient w.r.t. copy b is example b's gradient. Whether this holds is not assumed from the module's
# type: in every computation, the module's first micro-batch that can tell (two or more examples whose per-example
# gradients differ) runs both replays, and only if they agree does the batched one serve the rest of that
# computation. A forward that reduces over its parameter (``w.mean()``) mixes examples and fails the comparison.
_BROADCAST_RTOL = 1e-4


class ReplayVerdicts:
    """Which generic modules may use the batched replay, judged afresh in every computation (an engine clears it
    when a computation starts): a verdict never outlives the data, the tracked parameters or the module state it
    was judged on. Keyed by module identity, its forward and the tracked parameter names."""

    def __init__(self) -> None:
        self._verdicts: dict[tuple[int, object, frozenset[str]], bool] = {}

    def clear(self) -> None:
        self._verdicts.clear()

    @staticmethod
    def _key(module: nn.Module, tracked: set[str]) -> tuple[int, object, frozenset[str]]:
        return id(module), module.__dict__.get("forward", type(module).forward), frozenset(tracked)

    def get(self, module: nn.Module, tracked: set[str]) -> bool | None:
        return self._verdicts.get(self._key(module, tracked))

    def judge(self, module: nn.Module, call: Call, params: dict, batch_size: int, reference: dict) -> None:
        """Record whether the batched replay reproduces ``reference`` (the per-example VJP), if this batch can
        tell: at least two examples with different, non-zero gradients."""
        key = self._key(module, set(reference))
        if key in self._verdicts or not _informative(reference, batch_size):
            return
        fast = _broadcast_replay(module, call, params, batch_size)
        self._verdicts[key] = fast is not None and all(_close(fast[n], reference[n]) for n in reference)


def _informative(reference: dict[str, torch.Tensor], batch_size: int) -> bool:
    """Whether per-example gradients would expose a replay that mixes examples: two or more examples, every
    parameter's gradient non-zero, and at least two examples whose gradients differ."""
    if batch_size < 2:
        return False
    rows = torch.cat([g.reshape(batch_size, -1) for g in reference.values()], dim=1)
    scale = rows.abs().max().item()
    if not scale > 0 or any(not g.abs().max().item() > 0 for g in reference.values()):
        return False
    return bool((rows - rows[:1]).abs().max().item() > 1e-3 * scale)


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape or not torch.isfinite(x).all():
        return False
    scale = y.abs().max().item()
    return bool((x - y).abs().max().item() <= _BROADCAST_RTOL * scale) if scale > 0 else bool((x == 0).all())


def _broadcast_replay(module: nn.Module, call: Call, params: dict, batch_size: int) -> dict | None:
    """Per-example gradients from one batched replay with per-example parameter copies, or None where the call
    does not allow it (flattened or shared layouts, outputs of another shape, an error in the forward)."""
    if any(layout is not Layout.BATCHED for layout in call.out_layouts) or any(
        layout is Layout.FLAT for layout in call.layouts.values()
    ):
        return None
    ndim = min(g.dim() for g in call.grads)
    copies = {}
    for n, p in params.items():
        lead = ndim - 1 - p.dim()
        if lead < 0:
            return None
        copies[n] = p.detach().reshape(1, *([1] * lead), *p.shape).expand(batch_size, *([1] * lead), *p.shape)
        copies[n] = copies[n].clone().requires_grad_(True)
    device_type, enabled, dtype = call.autocast
    try:
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            out_leaves = pytree.tree_leaves(_replay(module, copies, call.args, call.kwargs))
            ys = [out_leaves[i] for i in call.out_index]
            if any(y.shape != g.shape for y, g in zip(ys, call.grads, strict=True)):
                return None
            grads = torch.autograd.grad(
                ys, list(copies.values()), [g.to(y.dtype) for y, g in zip(ys, call.grads, strict=True)],
                allow_unused=True,
            )  # fmt: skip
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None
    out = {}
    for (n, p), g in zip(params.items(), grads, strict=True):
        out[n] = torch.zeros(batch_size, *p.shape, dtype=ACC, device=p.device) if g is None else g.reshape(
            batch_size, *p.shape).to(ACC)  # fmt: skip
    return out


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


class Rows:
    """The features of up to ``capacity`` examples of one side, each written once into its final place.

    A materialized block gets one ``(capacity, numel)`` float32 tensor, allocated at its first micro-batch, whose
    rows the micro-batches fill in turn (:func:`block_feature` builds into them); a ghost block keeps its
    micro-batch parts (their token widths differ). With ``in_place=False`` (a score variant that transforms the
    features) every block keeps parts. Reused after :meth:`clear` without new allocations (memory written for
    the first time costs page faults: on a CPU, a fresh buffer for every group made the products slower than no
    grouping at all).
    """

    def __init__(self, blocks: Sequence[Block], capacity: int, in_place: bool = True) -> None:
        self.blocks, self.capacity, self.in_place = blocks, capacity, in_place
        self.filled = 0
        self._buffers: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._parts: list[list[Feature]] = [[] for _ in self.blocks]

    def room(self) -> int:
        return self.capacity - self.filled

    def slots(self, n: int, device: torch.device) -> list[torch.Tensor | None]:
        """Per block, the next ``n`` rows of its buffer to build a micro-batch's feature in (None: build anew)."""
        if n > self.room():
            raise ValueError(f"{n} more rows do not fit: {self.filled} of {self.capacity} are filled.")
        views: list[torch.Tensor | None] = []
        for k, block in enumerate(self.blocks):
            if not self.in_place or block.route != "materialize":
                self._buffers[k] = None  # (a route may change between computations)
                views.append(None)
                continue
            buffer = self._buffers[k]
            if buffer is None or buffer.device != device or buffer.shape[1] != block.numel:
                self._buffers[k] = torch.empty(self.capacity, block.numel, dtype=ACC, device=device)
            views.append(self._buffers[k][self.filled : self.filled + n])
        return views

    def add(self, features: Sequence[Feature]) -> None:
        """Take one micro-batch's features (built in the rows :meth:`slots` gave, or copied there)."""
        n = len(features[0])
        for k, feature in enumerate(features):
            buffer = self._buffers[k]
            if buffer is None or not isinstance(feature, Materialized):
                self._parts[k].append(feature)
                continue
            rows = buffer[self.filled : self.filled + n]
            if feature.vec.data_ptr() != rows.data_ptr():
                rows.copy_(feature.vec)
        self.filled += n

    def features(self) -> list[list[Feature]]:
        """Per block, its parts in row order (one part for a materialized block's filled rows)."""
        return [
            [Materialized(buffer[: self.filled])] if buffer is not None else list(parts)
            for buffer, parts in zip(self._buffers, self._parts, strict=True)
        ]

    def clear(self) -> None:
        self.filled = 0
        for parts in self._parts:
            parts.clear()


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
    if x.a.dim() == 2:  # token ids
        return _id_products(x, y)
    out = torch.empty(len(x), len(y), dtype=ACC, device=x.g.device)
    per_y = max(1, _GHOST_CHUNK_ELEMENTS // max(1, len(x) * x.g.shape[1] * y.g.shape[1]))
    for start in range(0, len(y), per_y):
        stop = min(start + per_y, len(y))
        out[:, start:stop] = _ghost_block(x, Ghost(y.a[start:stop], y.g[start:stop]))
    return out


def _ghost_block(x: Ghost, y: Ghost) -> torch.Tensor:
    kg = torch.einsum("xtd,ysd->xyts", x.g, y.g)
    ka = torch.einsum("xtd,ysd->xyts", x.a, y.a)
    return (ka * kg).sum(dim=(2, 3))


# ------------------------------------------------------------------------- embeddings: rows looked up

# Pairs of matching rows multiplied at a time (bounds the temporary (pairs, d) products).
_ROW_PAIRS_CHUNK = 1 << 16


def _rows(x: Ghost) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An embedding feature as the rows its gradient really has: ``(example, token id, summed output gradient)``
    for every distinct id an example looked up (positions with a zero gradient, such as padding, dropped).

    The per-example embedding gradient is ``Σ_t onehot(x_t) g_tᵀ``: row ``v`` is the sum of ``g_t`` over the
    positions holding ``v``; these are its only non-zero rows.
    """
    if x.rows is not None:
        return x.rows
    n, t = x.a.shape
    ids, g = x.a.reshape(-1), x.g.reshape(n * t, -1)
    example = torch.arange(n, device=g.device).repeat_interleave(t)
    live = g.ne(0).any(dim=1)
    ids, g, example = ids[live], g[live], example[live]
    vocab = int(ids.max()) + 1 if ids.numel() else 1
    keys, inverse = torch.unique(example * vocab + ids, return_inverse=True)  # sorted by (example, id)
    rows = torch.zeros(len(keys), g.shape[1], dtype=ACC, device=g.device).index_add_(0, inverse, g)
    x.rows = (keys // vocab, keys % vocab, rows)
    return x.rows


def _id_products(x: Ghost, y: Ghost) -> torch.Tensor:
    """Exact ``<∇E_i, ∇E_j>`` for token-id features: only rows both examples looked up contribute, so rows are
    matched by id (sort + search) instead of comparing every pair of positions or forming ``vocab x d`` rows."""
    out = torch.zeros(len(x) * len(y), dtype=ACC, device=x.g.device)
    x_ex, x_id, x_rows = _rows(x)
    y_ex, y_id, y_rows = _rows(y)
    if not len(x_id) or not len(y_id):
        return out.view(len(x), len(y))
    y_id, order = torch.sort(y_id, stable=True)
    y_ex, y_rows = y_ex[order], y_rows[order]
    lo = torch.searchsorted(y_id, x_id, right=False)
    count = torch.searchsorted(y_id, x_id, right=True) - lo
    total = int(count.sum())
    if total:
        left = torch.repeat_interleave(torch.arange(len(x_id), device=out.device), count)
        first = torch.cumsum(count, 0) - count  # where each x row's matches start among all matches
        right = lo[left] + torch.arange(total, device=out.device) - first[left]
        for start in range(0, total, _ROW_PAIRS_CHUNK):
            li, ri = left[start : start + _ROW_PAIRS_CHUNK], right[start : start + _ROW_PAIRS_CHUNK]
            dots = torch.linalg.vecdot(x_rows[li], y_rows[ri])
            out.index_add_(0, x_ex[li] * len(y) + y_ex[ri], dots)
    return out.view(len(x), len(y))


def sq_norms(x: Feature) -> torch.Tensor:
    """Squared gradient norms ``<∇_i, ∇_i>``, shape ``(len(x),)``."""
    if isinstance(x, Materialized):
        return torch.linalg.vecdot(x.vec, x.vec)
    if x.a.dim() == 2:  # token ids: the squared norms of the rows looked up
        example, _, rows = _rows(x)
        return torch.zeros(len(x), dtype=ACC, device=x.g.device).index_add_(0, example, torch.linalg.vecdot(rows, rows))
    kg = torch.bmm(x.g, x.g.transpose(1, 2))
    return (torch.bmm(x.a, x.a.transpose(1, 2)) * kg).sum(dim=(1, 2))
