"""The influence engine: exact per-example gradient inner products from one forward/backward per micro-batch.

Usage::

    engine = InfluenceEngine(model, pad_token_id=tokenizer.pad_token_id)
    result = engine.compute(probe_examples, eval_examples)   # examples: {"input_ids": [...], "labels": [...]}
    result.dot            # (n_probe, n_eval)  <∇ℓ(z), ∇ℓ(z0)>
    result.eval_sq_norm   # (n_eval,)          <∇ℓ(z0), ∇ℓ(z0)>

ℓ(z) is the *sum* of token cross-entropies over the example's supervised tokens (``labels != -100``, after
the usual one-token shift). The engine never touches ``.grad``, optimizer state or the global RNG, and it
restores every module's train/eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration import ConfigError
from ..errors import UserError
from . import distributed as dist_utils
from . import sharding
from . import verify as verify_lib
from .arguments import AUTO, InfluenceArguments
from .capture import Capture, make_inputs_require_grad
from .features import ACC, Feature, ReplayVerdicts, Rows, block_feature, pairwise, sq_norms
from .modules import Block, UnsupportedModelError, find_blocks, get_path
from .variants import make_variant

Example = Mapping[str, Sequence[int]]
IGNORE_INDEX = -100
logger = logging.getLogger(__name__)
# Streamed-side features held together before their product with the held side (see ``_local``).
_STREAM_GROUP_BYTES = 64 << 20
# The most feature memory of each side whose buffers are kept from one computation to the next (see ``_rows``).
_KEPT_ROWS_BYTES = 64 << 20


@dataclass
class InfluenceResult:
    """Raw inner products and per-example diagnostics of one ``compute`` call (float64, on CPU)."""

    dot: torch.Tensor
    probe_sq_norm: torch.Tensor
    eval_sq_norm: torch.Tensor
    probe_loss: torch.Tensor
    eval_loss: torch.Tensor
    probe_tokens: torch.Tensor
    eval_tokens: torch.Tensor


@dataclass(frozen=True)
class _Plan:
    """How one ``compute`` runs: which side's features are held, and how many of its examples per chunk."""

    hold_evals: bool
    chunk: int


@dataclass
class _Side:
    """Per-example results of one side (held or streamed), rows in the order they were computed.

    Features stay in the micro-batch parts they were built in (written once, never concatenated or re-ordered);
    ``order`` gives the example index of each row, and only the small per-example tensors and the dot matrix are
    put in example order at the end (``_in_order``).
    """

    features: list[list[Feature]] | None  # per block, the micro-batch parts (held side only)
    dot: torch.Tensor | None  # (rows, held rows in their computed order) (streamed side only)
    sq_norm: torch.Tensor
    loss: torch.Tensor
    tokens: torch.Tensor
    order: list[int]


class InfluenceEngine:
    """Per-example gradient inner products on a live model.

    Args:
        model: A causal LM (``model(input_ids, attention_mask).logits``), unwrapped from DDP and DeepSpeed
            engines. Sharded models work as they are (FSDP2 ``fully_shard`` and ZeRO-3 shard in place); under
            FSDP1 pass the root ``FullyShardedDataParallel`` wrapper, whose forward gathers the root's
            parameters. See ``docs/sharding.md``.
        pad_token_id: Token id used to right-pad micro-batches. It never changes a result.
        args: The engine options (:class:`~swift_callbacks.influence.arguments.InfluenceArguments`: param_filter,
            route, micro_batch_size, max_feature_bytes, verify, precision, score), or give them as keywords
            (``InfluenceEngine(model, route="ghost")``). Unknown or invalid options raise ``ConfigError``.
    """

    def __init__(
        self, model: nn.Module, *, pad_token_id: int = 0, args: InfluenceArguments | None = None, **options: Any
    ) -> None:
        if args is not None and options:
            raise ConfigError(f"pass the engine options in args or as keywords, not both (got {sorted(options)})")
        args = args if args is not None else InfluenceArguments.from_options(options)
        args.check()
        self.args = args
        self.model = model
        self.pad_token_id = pad_token_id
        self.variant = make_variant(args.score, args.score_options)
        self.blocks: list[Block] = find_blocks(model, args.param_filter)
        self.variant.check_blocks(model, self.blocks)  # a variant that cannot serve these blocks says so now
        self.verification: verify_lib.Report | None = None  # the last verification's report
        self._verified_state: tuple | None = None
        self._attempted_state: tuple | None = None
        self._attempts = 0
        self._routes_chosen = False
        self.sum_check_error = 0.0  # largest batch-sum error seen on the micro-batches of computations
        # How the model is sharded, found again at every tracking pass (sharding may be applied after set-up).
        self._sharded = False
        self._zero3 = False
        self._progress = _Counter(None, 0)
        self._kept_rows: dict[str, Rows] = {}  # per side ("held", "streamed"), see _rows
        self._replay_verdicts = ReplayVerdicts()  # judged afresh in every computation
        self._computing = False
        # The caller's autocast state per device type, re-entered around the model's forward (see _tracking).
        self._caller_autocast: dict[str, tuple[bool, torch.dtype]] = {}

    def _option(name: str) -> property:
        """An engine option read from and written to ``self.args`` (a new value is checked like the others)."""

        def get(self: InfluenceEngine) -> Any:
            return getattr(self.args, name)

        def set_(self: InfluenceEngine, value: Any) -> None:
            self._refuse_inside_compute(f"{name} (set)")
            args = dataclasses.replace(self.args, **{name: value})
            args.check()
            self.args = args
            if name == "param_filter":
                self.blocks = find_blocks(self.model, args.param_filter)
            self._routes_chosen = self._routes_chosen and name != "route"

        return property(get, set_)

    param_filter = _option("param_filter")
    route = _option("route")
    micro_batch_size = _option("micro_batch_size")
    micro_batch_tokens = _option("micro_batch_tokens")
    max_feature_bytes = _option("max_feature_bytes")
    verify = _option("verify")
    precision = _option("precision")
    del _option

    @property
    def num_tracked_params(self) -> int:
        return sum(b.numel for b in self.blocks)

    # ------------------------------------------------------------------------------------------ public

    def compute(
        self,
        probes: Sequence[Example],
        evals: Sequence[Example],
        progress: Progress | None = None,
        optimizer: Any = None,
    ) -> InfluenceResult:
        """Inner products of every probe gradient with every evaluation gradient, plus squared norms.

        One side's features are held (in chunks when they exceed ``max_feature_bytes``) while the other side is
        streamed past them a micro-batch at a time; :meth:`_plan` holds the side that runs fewer forward/backward
        passes in all (usually the smaller one), so a large evaluation set against a few probes needs only the
        probes' features in memory.

        Under ``torch.distributed`` every rank must call this with the same examples; each rank processes an
        equal share and every rank returns the full result. One computation per engine at a time: a call from
        inside another (its progress callback) is refused, and the engine is not thread-safe.

        Args:
            probes: Tokenized probe examples (``input_ids`` and ``labels``).
            evals: Tokenized evaluation examples.
            progress: Called as ``progress(done, total)`` after every micro-batch, with the number of examples
                this rank has run forward/backward so far and will run in all (an example of the streamed side
                counts once per chunk of the held side, see :meth:`_plan`).
            optimizer: The training's optimizer, for score variants that read its state (``"adam"``).
        """
        self._refuse_inside_compute("compute()")
        if not probes or not evals:
            raise ValueError("compute() needs at least one probe and one evaluation example.")
        self._computing = True
        try:
            return self._compute(probes, evals, progress, optimizer)
        finally:
            self._computing = False
            for rows in self._kept_rows.values():
                rows.clear()  # keep the buffers, not the last micro-batches' ghost parts (activations)

    def _compute(
        self, probes: Sequence[Example], evals: Sequence[Example], progress: Progress | None, optimizer: Any
    ) -> InfluenceResult:
        self._check_examples(probes, "probe")
        self._check_examples(evals, "evaluation")
        sharding.check_model(self.model)  # wrapped since set-up (an FSDP1 wrapper applied around it) is an error
        # Set up first: a variant's feature sizes, and the memory its set-up takes, enter the plan.
        self.variant.setup(self.model, self.blocks, optimizer)
        plan = self._plan(probes, evals)
        self._replay_verdicts.clear()
        held, streamed = (evals, probes) if plan.hold_evals else (probes, evals)
        roles = ("eval", "probe") if plan.hold_evals else ("probe", "eval")
        starts = range(0, len(held), plan.chunk)
        total = sum(_share(min(plan.chunk, len(held) - start)) + _share(len(streamed)) for start in starts)
        self._progress = _Counter(progress, total)
        dots, held_sides, st = [], [], None
        with self._tracking(), contextlib.ExitStack() as stack:
            stack.callback(setattr, self, "_progress", _Counter(None, 0))
            with self._telling_peers():
                self._verify_state([*probes, *evals])
            for start in starts:
                hd = self._side(held[start : start + plan.chunk], roles[0])
                st = self._side(streamed, roles[1], hd.features)
                columns = dist_utils.first_positions(hd.order, min(plan.chunk, len(held) - start))
                dots.append(st.dot[:, columns.to(st.dot.device)])  # held columns in example order
                held_sides.append(_in_order(hd, columns))
                del hd  # this chunk's features
        rows = dist_utils.first_positions(st.order, len(streamed))
        st = _in_order(st, rows)
        hd = _join(held_sides)  # chunks, each already in example order
        dot = torch.cat(dots, dim=1)[rows.to(dots[0].device)]
        pr, ev = (st, hd) if plan.hold_evals else (hd, st)
        return InfluenceResult(
            dot=(dot if plan.hold_evals else dot.T.contiguous()).double().cpu(),
            probe_sq_norm=pr.sq_norm.double().cpu(),
            eval_sq_norm=ev.sq_norm.double().cpu(),
            probe_loss=pr.loss.double().cpu(),
            eval_loss=ev.loss.double().cpu(),
            probe_tokens=pr.tokens.cpu(),
            eval_tokens=ev.tokens.cpu(),
        )

    def _refuse_inside_compute(self, what: str) -> None:
        """A computation's buffers (kept rows, verdicts, progress, the caller's autocast state) and blocks belong to
        it until it returns: nothing may call into the same engine from inside it (its progress callback). The
        engine is not thread-safe either."""
        if self._computing:
            raise ConfigError(
                f"InfluenceEngine.{what} was called while a compute() of the same engine is running (from its "
                "progress callback?); call it after that one returns, or use a second engine."
            )

    def check(self, examples: Sequence[Example]) -> verify_lib.Report:
        """Verify the engine against autograd on a sample of ``examples`` now, whatever ``verify`` says.

        Routes are chosen for ``examples`` if no ``compute`` ran yet. Counts as the verification of the current
        model for ``compute`` when every block was tested (blocks with no gradient yet are tested again later).

        Raises:
            VerificationError: naming the first parameter whose reconstruction disagrees.
        """
        self._refuse_inside_compute("check()")
        self._check_examples(examples, "verification")
        if not self._routes_chosen:
            lengths = [len(e["input_ids"]) for e in examples]
            self._choose_routes(len(examples), len(examples), sum(lengths) / len(lengths))
        with self._tracking():
            return self._verify_state(examples, force=True)

    def _verify_state(self, examples: Sequence[Example], force: bool = False) -> verify_lib.Report | None:
        """Verify (inside ``_tracking``) unless this model state already passed a complete verification."""
        if not force and not self.verify:
            return None  # verify=False: not even the model walk below
        state = self._model_state()
        if not force and self.verify != "every_save" and state == self._verified_state:
            return None
        # Each further attempt on the same model draws a new sample (every_save, or blocks still untested).
        self._attempts = self._attempts + 1 if state == self._attempted_state else 1
        self._attempted_state = state
        report = self._verify(verify_lib.sample(examples, attempt=self._attempts - 1))
        # Done once every block was really tested; blocks that get no gradient on 3 different samples stop it
        # (the batch-sum check on every micro-batch still covers them).
        if report.complete or self._attempts >= 3:
            self._verified_state = state
        return report

    # --------------------------------------------------------------------------------------- internals

    def _verify(self, examples: Sequence[Example]) -> verify_lib.Report:
        """Run the verification passes (inside ``_tracking``) and keep the report."""
        start = time.perf_counter()
        if self._sharded:
            # Autograd's gradient w.r.t. a sharded parameter is not a plain tensor gradient; the sharded modes are
            # checked against brute force in the test suite instead (tests/test_fsdp*.py).
            report = verify_lib.Report(len(examples), len(self.blocks), 0.0, torch.float32, skipped="sharded model")
            logger.info("Influence self-verification skipped: the model is sharded (FSDP / ZeRO-3).")
        else:
            # In float32 whatever the tracking precision: the rules are the same code in every precision, and a
            # bf16 tolerance would let a wrong rule by a few percent through.
            with full_precision(self.model, sharded=False), self._forward_in_float32():
                batch = self._forward_backward(examples, reference=True, grams=True)[-1]
                singles = [self._forward_backward([e], reference=True)[-1] for e in examples]
                plain = self._plain_losses(examples)
            report = verify_lib.check(self.blocks, batch, singles, plain)
        report.seconds = time.perf_counter() - start
        self.verification = report
        logger.info(
            "Influence self-verification passed on %d examples and %d blocks in %.2fs (max relative errors: %s; the "
            "model's own batch-vs-alone difference: %.1e).", report.examples, report.blocks, report.seconds,
            ", ".join(f"{k} {v:.1e}" for k, v in report.max_error.items()) or "-", report.batch_vs_alone,
        )  # fmt: skip
        if report.unchecked:
            logger.info(
                "%d blocks had no gradient on the verification examples (e.g. %s) and are checked again at the next "
                "computation.", len(report.unchecked), report.unchecked[0],
            )  # fmt: skip
        return report

    def _model_state(self) -> tuple:
        """What the verification depends on: every module (identity, type, forward), the tracked parameters'
        shapes and dtypes, the routes and the sharding. A change of any of them triggers a new verification."""
        modules = tuple((name, id(m), type(m), "forward" in m.__dict__) for name, m in self.model.named_modules())
        params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in self.model.named_parameters())
        return modules, params, tuple(b.route for b in self.blocks), self._sharded, self.precision

    def _plan(self, probes: Sequence[Example], evals: Sequence[Example]) -> _Plan:
        """Routes, the side whose features are held and its chunk size, from counts, lengths and the budget.

        Routes start from FLOPs; for each side, blocks then move to the ghost route where that saves bytes while
        that side held would be chunked (:meth:`_fit_routes`). Holding side A (``n_A`` examples, ``c_A`` chunks
        within the budget, with A's fitted routes) and streaming side B costs ``n_A + c_A * n_B``
        forward/backward passes; the cheaper way is taken, and on a tie (both fit) the side with fewer feature
        bytes is held (then the evaluation side). Every rank computes the same plan (same examples, the smallest
        budget over ranks).
        """
        p_max, e_max = (max(len(e["input_ids"]) for e in side) for side in (probes, evals))
        lengths = [len(e["input_ids"]) for e in (*probes, *evals)]
        self._choose_routes(len(probes), len(evals), sum(lengths) / len(lengths))
        budget = self._budget()
        by_flops = [b.route for b in self.blocks]

        def fitted(n: int, t: int, n_other: int) -> tuple[tuple[int, int], int, list[str]]:
            for block, route in zip(self.blocks, by_flops, strict=True):
                block.route = route
            self._fit_routes(n, t, budget)
            chunk = self._chunk_size(n, t, budget)
            cost = (n + -(-n // chunk) * n_other, n * self._example_bytes(t))  # (passes, bytes held)
            return cost, chunk, [b.route for b in self.blocks]

        with_evals, with_probes = fitted(len(evals), e_max, len(probes)), fitted(len(probes), p_max, len(evals))
        hold_evals = with_evals[0] <= with_probes[0]
        _, chunk, routes = with_evals if hold_evals else with_probes
        for block, route in zip(self.blocks, routes, strict=True):
            block.route = route
        return _Plan(hold_evals=hold_evals, chunk=chunk)

    def _choose_routes(self, n_probe: int, n_eval: int, mean_len: float) -> None:
        """Each linear or embedding block's route by FLOPs (see :meth:`_plan` for bytes)."""
        self._routes_chosen = True
        n, pairs, t = n_probe + n_eval, n_probe * n_eval + n_probe + n_eval, mean_len
        for block in self.blocks:
            if block.kind not in {"linear", "embedding"} or self.route == "materialize" or self.variant.materialized:
                block.route = "materialize"
                continue
            if self.route == "ghost":
                block.route = "ghost"
                continue
            if block.kind == "linear":
                d_in, d_out = block.linear_dims
                materialize = n * t * d_in * d_out + pairs * d_in * d_out
                ghost = pairs * t * t * (d_in + d_out)
            else:
                module = block.modules[0][1]
                # Rows matched by id: about one matching row per position for natural text (repeated tokens). The
                # factor 8 weighs its sorting and indexing against dense products: at vocab 512 (the benchmark's
                # tiny model) the matched rows took ~5x the dense route's time, at vocab 151,936 a third of the
                # position-pair kernel's (CPU, 2026-11-28).
                d, vocab = module.embedding_dim, module.num_embeddings
                materialize = n * vocab * d + pairs * block.numel
                ghost = 8 * (n * t * d + pairs * t * (d + 1))
            block.route = "ghost" if ghost < materialize else "materialize"

    def _fit_routes(self, n_held: int, t_max: int, budget: int) -> None:
        """Bytes, not only FLOPs: while the held side would overflow the feature budget (which splits it into
        chunks, each re-running the streamed side), move to the ghost route the materialized block that saves the
        most bytes per example, as long as its ghost form is smaller."""
        if self.route != "auto" or self.variant.materialized:
            return
        total = n_held * self._example_bytes(t_max)
        candidates = [
            (self._block_bytes(b, "materialize", t_max) - self._block_bytes(b, "ghost", t_max), i, b)
            for i, b in enumerate(self.blocks)
            if b.kind in {"linear", "embedding"} and b.route == "materialize"
        ]
        for saving, _, block in sorted(candidates, key=lambda c: (-c[0], c[1])):
            if total <= budget or saving <= 0:
                return
            block.route = "ghost"
            total -= n_held * saving

    def _example_bytes(self, t: int) -> int:
        """Bytes of one example's features (all blocks) at ``t`` tokens."""
        return max(sum(self._block_bytes(block, block.route, t) for block in self.blocks), 1)

    def _block_bytes(self, block: Block, route: str, t: int) -> int:
        """Bytes of one example's feature of ``block`` on ``route`` at ``t`` tokens."""
        if (numel := self.variant.feature_numel(block)) is not None:
            return numel * 4
        if route == "materialize":
            return block.numel * 4
        if block.kind == "linear":
            return t * sum(block.linear_dims) * 4
        return t * (block.modules[0][1].embedding_dim * 4 + 8)

    def _chunk_size(self, n_held: int, t_max: int, budget: int) -> int:
        """Held examples per chunk. Not multiplied by the world size: each rank computes 1/world of a chunk but,
        after the all-gather, holds the features of all of it."""
        return max(1, min(n_held, budget // self._example_bytes(t_max)))

    def _budget(self) -> int:
        """``max_feature_bytes``, or with ``"auto"`` half the memory free now on the compute device (divided among
        the processes of this host), the smallest over ranks: every rank must cut the same chunks."""
        if self.max_feature_bytes != AUTO:
            return self.max_feature_bytes
        device = self._device()
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = _available_host_memory() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        budget = max(1, free // 2)
        if dist_utils.is_distributed():
            budget = min(dist_utils.all_gather_cpu(budget))
        return budget

    def _side(self, examples: Sequence[Example], role: str, held: list[list[Feature]] | None = None) -> _Side:
        """Process ``examples`` split over ranks and gather the results on every rank (rows in computed order,
        ``order`` naming each row's example; under distributed runs the padded shards repeat an example).

        Without ``held`` features the side keeps per-example features (the held side); with them it keeps only
        the dot products against them (the streamed side), so its features never accumulate. ``role`` is
        ``"probe"`` or ``"eval"``, for score variants that treat the two differently.
        """
        if not dist_utils.is_distributed():
            return self._local(examples, role, held)
        index = dist_utils.shard(len(examples), dist_utils.world_size(), dist_utils.rank())
        with self._telling_peers():
            local = self._local([examples[i] for i in index], role, held)
        if not self._sharded:
            dist_utils.agree()
        local.order = [index[i] for i in local.order]
        gathered = dist_utils.all_gather_cpu(local)
        device = local.sq_norm.device  # the compute device (not the parameters' under CPU offload)
        return dist_utils.map_tensors(_join(gathered), lambda t: t.to(device))

    def _local(self, examples: Sequence[Example], role: str, held: list[list[Feature]] | None) -> _Side:
        """This rank's examples, one forward/backward per micro-batch, rows in computed order.

        The held side's features are built into one :class:`Rows` for the whole side; the streamed side's into a
        smaller one whose rows are multiplied with the held side whenever it is full, so one product covers many
        examples (a matrix product reads the held features once per group, not once per micro-batch).
        """
        if self._sharded and self.micro_batch_tokens is not None:
            # Sharded modules gather their parameters collectively: every rank must run as many forwards.
            raise ConfigError(
                "micro_batch_tokens cannot be used with a sharded model (FSDP / ZeRO-3): ranks would run different "
                "numbers of forward passes. Use micro_batch_size alone."
            )
        order: list[int] = []
        n = len(examples)
        dots, norms, losses, counts = _Column(n), _Column(n), _Column(n), _Column(n)
        streamed = held is not None
        per_example = self._example_bytes(max(len(e["input_ids"]) for e in examples))
        if streamed:
            rows = self._rows("streamed", self._stream_group(len(examples), per_example), per_example)
        else:
            rows = self._rows("held", len(examples), per_example)
        checked = self.verify in (True, "every_save") and not self._sharded
        with self._capture(checked) as capture:  # attached once for the side: hooks cost time to attach
            for batch in self._micro_batches(examples):
                if streamed and len(batch) > rows.room():
                    dots.add(_dots(rows.features(), held))
                    rows.clear()
                feats, norm, loss, tokens, sums = self._forward_backward(
                    [examples[i] for i in batch], reference=checked, rows=rows, capture=capture
                )
                if sums is not None:
                    self.sum_check_error = max(self.sum_check_error, verify_lib.check_sums(self.blocks, sums))
                if not self.variant.exact:  # scores from the variant's features (checked above on the exact ones)
                    feats = self.variant.transform(self.blocks, feats, role)
                    norm = sum((sq_norms(f) for f in feats), torch.zeros_like(norm))
                rows.add(feats)
                del feats
                order.extend(batch)
                norms.add(norm), losses.add(loss), counts.add(tokens)
                self._progress.advance(len(batch))
        if streamed and rows.filled:
            dots.add(_dots(rows.features(), held))
        norm = norms.result()
        return _Side(
            features=None if streamed else rows.features(),
            dot=dots.result().to(norm.device) if streamed else None,
            sq_norm=norm, loss=losses.result(), tokens=counts.result(), order=order,
        )  # fmt: skip

    def _rows(self, side: str, capacity: int, example_bytes: int) -> Rows:
        """A side's feature rows, kept from one computation to the next when they fit in ``_KEPT_ROWS_BYTES``
        (larger rows are not held between computations): memory written for the first time costs page faults
        (building per-example gradients into 34 MB of fresh memory took twice as long as into reused memory, in
        an isolated test on the CI machine kind)."""
        rows, exact = self._kept_rows.get(side), self.variant.exact
        if rows is None or rows.capacity != capacity or rows.in_place != exact or rows.blocks is not self.blocks:
            rows = Rows(self.blocks, capacity, in_place=exact)
        if capacity * example_bytes <= _KEPT_ROWS_BYTES:
            self._kept_rows[side] = rows
        else:
            self._kept_rows.pop(side, None)
        rows.clear()
        return rows

    def _stream_group(self, n: int, example_bytes: int) -> int:
        """Streamed examples whose features are held together before their product with the held side: at least one
        micro-batch, at most ``_STREAM_GROUP_BYTES`` of features (beyond one micro-batch's)."""
        return min(n, max(self.micro_batch_size, _STREAM_GROUP_BYTES // example_bytes))

    def _micro_batches(self, examples: Sequence[Example]) -> Iterator[list[int]]:
        """Index lists of micro-batches, sorted by length so little compute is spent on padding; each at most
        ``micro_batch_size`` examples and, with ``micro_batch_tokens``, that many padded tokens."""
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        batch: list[int] = []
        for i in order:
            width = len(examples[i]["input_ids"])  # the longest so far: lengths ascend
            full = len(batch) == self.micro_batch_size or (
                self.micro_batch_tokens is not None and (len(batch) + 1) * width > self.micro_batch_tokens
            )
            if batch and full:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @contextlib.contextmanager
    def _telling_peers(self) -> Iterator[None]:
        """Under a multi-process run, an error in the block is told to the other ranks, which wait for this one in
        ``dist_utils.agree`` at the end of the side (they raise too instead of waiting, or pairing this
        computation with this rank's next). Not on a sharded model: its ranks meet inside every forward, where a
        failed rank leaves the others waiting in the model's own collectives."""
        try:
            yield
        except Exception as err:
            if dist_utils.is_distributed() and not self._sharded and not isinstance(err, dist_utils.RankFailedError):
                dist_utils.tell_failure(err)
            raise

    def _capture(self, reference: bool) -> Capture:
        """Hooks recording the tracked modules' calls (attached on entering it, for one or more micro-batches).

        ZeRO-3 gathers a module's parameters before its backward and releases them after, in autograd functions
        wrapped around the module's outputs and inputs. A backward that stops at the tracked outputs leaves the
        modules around the earliest ones gathered and marked active; carrying it down to the input embeddings (as
        a training backward goes) runs every release, hence ``embedding`` under ZeRO-3.
        """
        watch = self.model.get_input_embeddings()
        embedding = watch if self._zero3 else None
        return Capture(self.blocks, embedding, copy_weights=self._sharded, keep_params=reference, watch=watch)

    def _forward_backward(
        self,
        examples: Sequence[Example],
        reference: bool = False,
        grams: bool = False,
        rows: Rows | None = None,
        capture: Capture | None = None,
    ):
        """One micro-batch: features per block, squared norms, losses and token counts; with ``reference`` also
        a ``verify.Pass`` holding autograd's gradient of the summed loss w.r.t. every tracked tensor, and with
        ``grams`` the Gram matrices of autograd's per-example gradients (one more backward per example: the
        verification's oracle only, never the per-micro-batch check). ``capture``: hooks already attached (with
        ``keep_params`` equal to ``reference``), reset afterwards; by default hooks are attached for this
        micro-batch alone."""
        # One more padding column when the width equals the number of examples: layouts are told apart by size.
        width = max(len(e["input_ids"]) for e in examples)
        min_width = width + 1 if len(examples) > 1 and width == len(examples) else width
        input_ids, attention_mask, labels = collate(examples, self.pad_token_id, self._device(), min_width)
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum(1)
        if capture is not None and capture.keep_params != reference:  # the reference needs the params recorded
            raise ValueError("a capture passed to _forward_backward must keep parameters exactly when reference")
        hooks = self._capture(reference) if capture is None else contextlib.nullcontext(capture)
        with hooks as capture, _resetting(capture):
            capture.batch_size, capture.width = input_ids.shape
            capture.recording = True
            try:
                logits = self._logits(input_ids, attention_mask)
            except Exception as err:  # any error of the model's code (KeyError, AssertionError, ...) is worded
                if isinstance(err, UserError):  # ours, already worded (UnsupportedModelError, ConfigError)
                    raise
                capture.recording = False
                raise UnsupportedModelError(self._forward_failure(err, capture, input_ids, attention_mask)) from err
            capture.recording = False
            if not capture.calls and not capture.embedding_ran:
                # Nothing of this model ran: every gradient would read as zero. Seen with a deep copy of a TRL
                # trainer, whose model forward stays bound to the original model's modules.
                raise UnsupportedModelError(
                    "The model's forward called none of the tracked modules (e.g. a copied model or trainer whose "
                    "forward is still bound to the original modules), so no gradient can be attributed. Track the "
                    "model that really runs: build the trainer again rather than copying it."
                )
            if logits.shape[:2] != input_ids.shape:
                raise UnsupportedModelError(
                    f"The model returned logits of shape {tuple(logits.shape)} for inputs of shape "
                    f"{tuple(input_ids.shape)} (e.g. PEFT prompt learning adds virtual tokens), so the loss cannot be "
                    "matched to the tokens; influence supports models with one logit row per input token."
                )
            device = logits.device  # the compute device, which a CPU-offloaded sharded model's parameters are not on
            loss = example_losses(logits, labels.to(device))
            dtypes = [logits.dtype, *(o.dtype for o in capture.outputs())]
            del logits
            outputs = capture.outputs()
            targets = self._reference_tensors(capture) if reference else []
            grads = torch.autograd.grad(
                loss.sum(),
                outputs + capture.embedding_outputs + [t for _, t in targets],
                allow_unused=True,
                retain_graph=grams,
            )
            capture.set_output_grads(grads[: len(outputs)], length=int(attention_mask.sum(1).max()))
            batch, width = input_ids.shape
            outs = rows.slots(batch, device) if rows is not None else [None] * len(self.blocks)
            # The verification (rows=None) checks the per-example replay; computations may use the batched one.
            verdicts = self._replay_verdicts if rows is not None else None
            feats, norm = [], torch.zeros(batch, dtype=ACC, device=device)
            for block, out in zip(self.blocks, outs, strict=True):
                feats.append(block_feature(block, capture.calls, batch, width, out, verdicts))
                norm += sq_norms(feats[-1])  # in cache: ~10% faster than a second pass over the features
            check = None
            if reference:
                refs = self._reference_grads(targets, grads[len(grads) - len(targets) :], device)
                check = verify_lib.Pass(
                    feats, refs, verify_lib.lowest_precision(dtypes), loss.detach().to(ACC), list(capture.expanded),
                    self._reference_grams(loss, targets, device) if grams else None, attention_mask.sum(1).tolist(),
                )  # fmt: skip
        del outputs, grads
        return feats, norm, loss.detach().to(ACC), tokens, check

    def _check_examples(self, examples: Sequence[Example], side: str) -> None:
        """Token ids and labels in range, one label per token: one clear line for the first bad example."""
        vocab = vocab_size(self.model)
        for i, e in enumerate(examples):
            ids, labels = list(e["input_ids"]), list(e["labels"])
            problem = None
            if not ids:
                problem = "has no tokens"
            elif len(labels) != len(ids):
                problem = f"has {len(labels)} labels for {len(ids)} tokens"
            elif not _all_integers((*ids, *labels)):
                problem = "has token ids or labels that are not integers"
            elif min(ids) < 0 or (vocab is not None and max(ids) >= vocab):
                problem = f"has token ids outside the vocabulary [0, {vocab})"
            elif any(x != IGNORE_INDEX and (x < 0 or (vocab is not None and x >= vocab)) for x in labels):
                problem = f"has labels outside the vocabulary [0, {vocab}) other than {IGNORE_INDEX}"
            if problem:
                raise ValueError(f"The {side} example at position {i} {problem}.")

    @contextlib.contextmanager
    def _forward_in_float32(self) -> Iterator[None]:
        """The model's forward without the caller's autocast inside the block (the verification's)."""
        saved = self._caller_autocast
        self._caller_autocast = {d: (False, dtype) for d, (_, dtype) in saved.items()}
        try:
            yield
        finally:
            self._caller_autocast = saved

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The model's forward, in the autocast state the computation was called in (see ``_autocast_off``; the
        verification's forward is float32, see ``_forward_in_float32``)."""
        with contextlib.ExitStack() as stack:
            for device_type, (enabled, dtype) in self._caller_autocast.items():
                # Without autocast's weight cache: within one region it keeps low-precision copies of weights
                # changed in place since (an optimizer step), and the scores would be of the old weights.
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False))
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _forward_failure(
        self, err: Exception, capture: Capture, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> str:
        """Why the hooked forward failed: whether the model also fails with the capture hooks detached is tried,
        not assumed (not on a sharded model, whose forward gathers parameters collectively on every rank)."""
        if not self._sharded:
            capture.detach()  # the computation ends with the error raised from here
            try:
                with torch.no_grad():
                    self._logits(input_ids, attention_mask)
            except Exception as plain:
                return (
                    f"The model's forward fails on a micro-batch of {input_ids.shape[0]} examples padded to "
                    f"{input_ids.shape[1]} tokens also without the influence engine's hooks ({type(plain).__name__}: "
                    f"{plain}). The engine calls model(input_ids=..., attention_mask=..., use_cache=False): make that "
                    "call work (e.g. activation checkpointing with use_reentrant=True takes no keyword arguments)."
                )
        return (
            f"The model's forward failed with the influence engine's hooks attached ({type(err).__name__}: {err}). "
            f"Track fewer parameters with param_filter, or {verify_lib.ISSUES}."
        )

    def _plain_losses(self, examples: Sequence[Example]) -> torch.Tensor:
        """Per-example losses of ``examples`` from the model as it is, without the engine's hooks."""
        input_ids, attention_mask, labels = collate(examples, self.pad_token_id, self._device())
        with torch.no_grad():
            logits = self._logits(input_ids, attention_mask)
            return example_losses(logits, labels.to(logits.device)).to(ACC)

    def _reference_tensors(self, capture: Capture) -> list[tuple[tuple[int, int], torch.Tensor]]:
        """Every tensor object a tracked parameter slot was used as, keyed by (block index, slot).

        A module that was not called contributes its parameter as it holds it now: if the model used that
        tensor some other way (read without calling the module), autograd's gradient exposes it.
        """
        targets, seen = [], set()
        for b, block in enumerate(self.blocks):
            for _, module in block.modules:
                for attr, slot in block.slots[id(module)].items():
                    used = capture.used_params.get((id(module), attr)) or [get_path(module, attr)]
                    for t in used:
                        if id(t) not in seen and t.requires_grad:
                            seen.add(id(t))
                            targets.append(((b, slot), t))
        return targets

    def _reference_grams(self, loss: torch.Tensor, targets, device) -> list[torch.Tensor]:
        """Per block, the Gram matrix of autograd's per-example gradients in this very micro-batch (one backward
        per example through the retained graph): the oracle of the engine's in-batch inner products, computed with
        the same arithmetic, so the model's own rounding differences between batch shapes do not enter."""
        tensors = [t for _, t in targets]
        rows: list[list[torch.Tensor]] = []
        for i in range(len(loss)):
            last = i == len(loss) - 1
            grads = torch.autograd.grad(loss[i], tensors, allow_unused=True, retain_graph=not last) if tensors else []
            rows.append(self._reference_grads(targets, grads, device))
        grams = []
        for k in range(len(self.blocks)):
            stacked = torch.stack([r[k] for r in rows]).double()  # float64: the oracle's own rounding stays negligible
            grams.append((stacked @ stacked.T).to(ACC))
        return grams

    def _reference_grads(self, targets, grads, device) -> list[torch.Tensor]:
        """Per block, autograd's gradient of the summed loss, flattened in the block's parameter order."""
        sums: dict[tuple[int, int], torch.Tensor] = {}
        for (key, _), g in zip(targets, grads, strict=True):
            if g is not None:
                g = g.detach().to(ACC).reshape(-1)
                sums[key] = g if key not in sums else sums[key] + g
        refs = []
        for b, block in enumerate(self.blocks):
            parts = [
                sums.get((b, k), torch.zeros(shape.numel(), dtype=ACC, device=device)).to(device)
                for k, shape in enumerate(block.shapes)
            ]
            refs.append(torch.cat(parts))
        return refs

    def _device(self) -> torch.device:
        """Where inputs go: the device of a tracked parameter as the model holds it now. (Under FSDP with CPU
        offload that is the CPU; the FSDP root moves inputs to its compute device itself.)"""
        return self.blocks[0].current_param().device

    @contextlib.contextmanager
    def _tracking(self) -> Iterator[None]:
        """Eval mode (no dropout), grad enabled, input-embedding output differentiable, FSDP2 gradient reduction
        off; all restored."""
        self._sharded, self._zero3 = sharding.is_sharded(self.model), sharding.is_zero3(self.model)
        modes = [(m, m.training) for m in self.model.modules()]
        handle = make_inputs_require_grad(self.model)
        self.model.eval()
        precision = full_precision(self.model, self._sharded) if self.precision == "fp32" else contextlib.nullcontext()
        try:
            with (
                torch.enable_grad(),
                sharding.no_gradient_reduction(self.model),
                precision,
                _autocast_off(self.model) as outer,
            ):
                self._caller_autocast = outer
                yield
        finally:
            self._caller_autocast = {}
            handle.remove()
            for module, mode in modes:
                module.training = mode


@contextlib.contextmanager
def _autocast_off(model: nn.Module) -> Iterator[dict[str, tuple[bool, torch.dtype]]]:
    """Autocast off inside the block for the CPU, CUDA when present and every device type the model's parameters
    are on, so the engine's own math (per-example gradients, squared norms, products) stays float32 when
    ``compute`` is called inside a ``torch.autocast`` region (there its matrix products would silently run in
    bf16). Yields the state it found per device type, ``(enabled, dtype)``, which ``InfluenceEngine._logits``
    turns back on around the model's forward: the model runs in the precision its caller asked for."""
    outer = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _autocast_device_types(model)}
    with contextlib.ExitStack() as stack:
        for device_type in outer:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield outer


def _autocast_device_types(model: nn.Module) -> list[str]:
    """The CPU, CUDA when present and the device types of the model's parameters, where autocast exists (not on
    "meta", say, where asking for its state raises)."""
    types = {"cpu", *(["cuda"] if torch.cuda.is_available() else []), *(p.device.type for p in model.parameters())}
    return sorted(t for t in types if torch.amp.is_autocast_available(t))


@contextlib.contextmanager
def full_precision(model: nn.Module, sharded: bool) -> Iterator[None]:
    """Run ``model`` in float32 inside the block: autocast off and low-precision weights upcast, all restored.

    Autocast is switched off twice: for any enclosing ``torch.autocast`` region, and for the autocast wrapper
    that ``accelerate`` installs as the model's instance ``forward`` under mixed precision (its
    ``_original_forward`` is called instead). bf16/fp16 parameters and buffers are upcast in place (``.data``, so
    optimizer and module references stay valid) and cast back afterwards, which restores them bit for bit.

    Raises:
        ValueError: Low-precision weights on a sharded model (their storage belongs to FSDP / ZeRO).
    """
    low = [t for t in (*model.parameters(), *model.buffers()) if t.dtype in (torch.bfloat16, torch.float16)]
    if low and sharded:
        raise ValueError(
            "precision='fp32' cannot upcast the bf16/fp16 weights of a sharded model; keep fp32 master weights "
            "(mixed precision through autocast, e.g. bf16=True with an fp32 model) or use precision='auto'."
        )
    original_forward = getattr(model, "_original_forward", None) if "forward" in model.__dict__ else None
    patched = model.__dict__.get("forward")
    dtypes = [t.dtype for t in low]
    try:
        for t in low:
            t.data = t.data.float()
        if original_forward is not None:
            model.forward = original_forward
        with contextlib.ExitStack() as stack:
            for device_type in _autocast_device_types(model):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        if original_forward is not None:
            model.forward = patched
        for t, dtype in zip(low, dtypes, strict=True):
            t.data = t.data.to(dtype)


@contextlib.contextmanager
def _resetting(capture: Capture) -> Iterator[None]:
    """Forget what ``capture`` recorded when the block ends (its tensors would keep the micro-batch's graph)."""
    try:
        yield
    finally:
        capture.reset()


def _all_integers(values: Sequence) -> bool:
    try:
        for v in values:
            operator.index(v)  # ints, NumPy integers, 0-d integer tensors
    except TypeError:
        return False
    return True


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (None when it has no standard one)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError):
        return None


Progress = Callable[[int, int], None]


@dataclass
class _Counter:
    """Examples run so far by this rank in one ``compute``, reported to the caller's progress function."""

    report: Progress | None
    total: int
    done: int = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.report is not None:
            self.report(self.done, self.total)


def _available_host_memory() -> int:
    """Bytes of host memory available now (Linux ``MemAvailable``; elsewhere psutil's, or 4 GiB with a warning)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        logger.warning("max_feature_bytes='auto': cannot read the free memory here; using 4 GiB.")
        return 4 << 30


class _Column:
    """Per-example values of one side (norms, losses, token counts, dot rows), written into one tensor allocated at
    the first micro-batch. Not one small tensor per micro-batch: thousands of those, each allocated between large
    temporaries and alive to the end, keep the C allocator from reusing or returning the memory around them (the
    resident set grew with the number of examples streamed)."""

    def __init__(self, n: int) -> None:
        """A column for ``n`` examples (rows); its dtype, device and row shape are those of the first values."""
        self.n, self.filled = n, 0
        self.data: torch.Tensor | None = None

    def add(self, values: torch.Tensor) -> None:
        """Write the next ``len(values)`` rows."""
        if self.data is None:
            self.data = values.new_empty((self.n, *values.shape[1:]))
        self.data[self.filled : self.filled + len(values)] = values
        self.filled += len(values)

    def result(self) -> torch.Tensor:
        """Every row, once all ``n`` were written (a shortfall would leave uninitialized rows: an error)."""
        if self.data is None or self.filled != self.n:
            raise RuntimeError(f"{self.filled} of {self.n} rows were computed; the side is incomplete.")
        return self.data


def _share(n: int) -> int:
    """How many of ``n`` examples this rank runs (shards are padded to equal length)."""
    if not dist_utils.is_distributed():
        return n
    return len(dist_utils.shard(n, dist_utils.world_size(), dist_utils.rank()))


def _dots(streamed: list[list[Feature]], held: list[list[Feature]]) -> torch.Tensor:
    """Inner products of the streamed rows with every held row, summed over blocks: ``(streamed rows, held rows)``,
    both in their computed order (each block's parts taken one after another)."""
    total = None
    for streamed_parts, held_parts in zip(streamed, held, strict=True):
        block = _cat([_cat([pairwise(s, h) for h in held_parts], dim=1) for s in streamed_parts], dim=0)
        total = block if total is None else total + block
    return total


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _join(sides: Sequence[_Side]) -> _Side:
    """Ranks' sides as one: feature parts listed one after another, small tensors and dots concatenated."""
    first = sides[0]
    features = None
    if first.features is not None:
        features = [[f for s in sides for f in s.features[k]] for k in range(len(first.features))]
    return _Side(
        features=features,
        dot=None if first.dot is None else torch.cat([s.dot for s in sides]),
        sq_norm=torch.cat([s.sq_norm for s in sides]),
        loss=torch.cat([s.loss for s in sides]),
        tokens=torch.cat([s.tokens for s in sides]),
        order=[i for s in sides for i in s.order],
    )


def _in_order(side: _Side, rows: torch.Tensor) -> _Side:
    """The small per-example tensors of ``side`` at ``rows``, i.e. in example order (no features, no dots: those
    are taken from the chunks as they are computed)."""
    pick = lambda t: t[rows.to(t.device)]  # noqa: E731
    return _Side(
        features=None, dot=None, sq_norm=pick(side.sq_norm), loss=pick(side.loss), tokens=pick(side.tokens),
        order=list(range(len(rows))),
    )  # fmt: skip


def collate(examples: Sequence[Example], pad_token_id: int, device: torch.device | str = "cpu", min_width: int = 0):
    """Right-pad ``input_ids``/``labels`` into tensors; returns ``(input_ids, attention_mask, labels)``."""
    width = max(min_width, *(len(e["input_ids"]) for e in examples))
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(e["input_ids"])
        labels[i, :n] = torch.as_tensor(e["labels"])
        attention_mask[i, :n] = 1
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example sum of next-token cross-entropy over supervised positions (fp32), shape ``(B,)``."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return token_loss.view(shift_labels.shape).sum(1)
