"""How influence is computed: the options of the engine, declared once.

:class:`InfluenceArguments` is used unchanged by :class:`~swift_callbacks.influence.InfluenceEngine`, by
``InfluenceCallback`` (its keyword arguments), by the ``influence.engine`` section of a training recipe and by
``swift-study score``. Each field's ``help`` metadata is its documentation everywhere (the CLI and the docs read
it); :meth:`InfluenceArguments.check` is the one validation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..configuration import ConfigError, build, join, parse_bytes, suggest

ROUTES = ("auto", "ghost", "materialize")
VERIFY = (True, False, "once", "every_save")
PRECISIONS = ("auto", "fp32")
AUTO = "auto"  # max_feature_bytes that follows the free memory


@dataclass
class InfluenceArguments:
    """Options of the influence engine (see each field's ``help``)."""

    param_filter: str | Callable[[str], bool] | None = field(default=None, metadata={"help": (
        "Regex (searched in parameter names) or predicate restricting the tracked trainable parameters; default: "
        "every parameter with requires_grad=True.")})  # fmt: skip
    route: Literal["auto", "ghost", "materialize"] = field(default="auto", metadata={"help": (
        "'auto' picks the cheaper exact route per block; 'ghost' (Gram matrices of layer inputs and output "
        "gradients) or 'materialize' (per-example gradients) forces one.")})  # fmt: skip
    micro_batch_size: int = field(default=8, metadata={"help": "Examples per tracking forward/backward."})
    micro_batch_tokens: int | None = field(default=None, metadata={"help": (
        "Padded tokens per tracking forward/backward (examples x the longest one's length): examples are taken in "
        "length order while a micro-batch stays within this and micro_batch_size (one long example alone may "
        "exceed it). Bounds activation memory when lengths vary; default: micro_batch_size alone.")})  # fmt: skip
    max_feature_bytes: int | str = field(default=2 << 30, metadata={"help": (
        "Budget for the held side's features per process (the probes' or the evaluation examples', whichever "
        "costs fewer passes), in bytes or as '2GiB' / '500MB', or 'auto' (half the memory free on the compute "
        "device at each computation, shared by the processes of a host, the smallest over ranks); beyond it the "
        "held side is processed in chunks, the other side once per chunk.")})  # fmt: skip
    verify: bool | Literal["once", "every_save"] = field(default=True, metadata={"help": (
        "True: check the engine against autograd on the live model when training starts and whenever the model "
        "changes, and every micro-batch's gradient sum at every computation; 'once': the start check only; "
        "'every_save': the start check at every computation too; False: no check.")})  # fmt: skip
    precision: Literal["auto", "fp32"] = field(default="auto", metadata={"help": (
        "'auto': track in the precision training uses (under bf16 autocast, about 2e-2 relative, measured); "
        "'fp32': the tracked forward/backward in fp32 with autocast off, exact to fp32 rounding.")})  # fmt: skip
    score: str = field(default="exact", metadata={"help": (
        "Score variant, a name registered in swift_callbacks.influence.variants ('exact': inner products of the "
        "full per-example gradients).")})  # fmt: skip
    score_options: dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "Keyword arguments of the score variant.")})  # fmt: skip

    def check(self, path: str = "") -> None:
        """Validate every field (a regex must compile, a size parse, the score variant exist).

        Raises:
            ConfigError: The message names the field (under ``path``) and what is allowed.
        """
        where = lambda name: join(path, name)  # noqa: E731
        if self.route not in ROUTES:
            raise ConfigError(f"{where('route')}: must be one of {', '.join(ROUTES)}, got {self.route!r}")
        if isinstance(self.micro_batch_size, bool) or not isinstance(self.micro_batch_size, int) or (
                self.micro_batch_size < 1):  # fmt: skip
            raise ConfigError(f"{where('micro_batch_size')}: must be >= 1, got {self.micro_batch_size!r}")
        if self.micro_batch_tokens is not None and (isinstance(self.micro_batch_tokens, bool) or not isinstance(
                self.micro_batch_tokens, int) or self.micro_batch_tokens < 1):  # fmt: skip
            raise ConfigError(f"{where('micro_batch_tokens')}: must be >= 1 or null, got {self.micro_batch_tokens!r}")
        if not isinstance(self.verify, bool | str) or self.verify not in VERIFY:
            raise ConfigError(f"{where('verify')}: must be true, false, 'once' or 'every_save', got {self.verify!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{where('precision')}: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.max_feature_bytes != AUTO:
            self.max_feature_bytes = parse_bytes(self.max_feature_bytes, where("max_feature_bytes"))
        if isinstance(self.param_filter, str):
            try:
                re.compile(self.param_filter)
            except re.error as err:
                raise ConfigError(f"{where('param_filter')}: not a valid regex ({err})") from err
        elif self.param_filter is not None and not callable(self.param_filter):
            raise ConfigError(f"{where('param_filter')}: must be a regex or a predicate, got {self.param_filter!r}")
        if not isinstance(self.score_options, Mapping):
            raise ConfigError(f"{where('score_options')}: must be a mapping of keyword arguments, "
                              f"got {self.score_options!r}")  # fmt: skip
        from .variants import SCORE_VARIANTS, make_variant

        if self.score not in SCORE_VARIANTS:
            raise ConfigError(f"{where('score')}: unknown score variant {self.score!r}; "
                              f"{suggest(self.score, list(SCORE_VARIANTS))}")  # fmt: skip
        try:  # its options too, before anything runs
            make_variant(self.score, dict(self.score_options))
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{where('score_options')}: {err}") from None

    @classmethod
    def from_options(cls, options: Mapping[str, Any], path: str = "") -> InfluenceArguments:
        """Checked arguments from keyword options (``InfluenceCallback(..., route="ghost")``).

        Raises:
            ConfigError: An unknown option (with the closest name) or a bad value.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in names:
                raise ConfigError(f"{join(path, key)}: unknown influence option; {suggest(key, names)}")
        args = cls(**options)
        args.check(path)
        return args

    @classmethod
    def from_config(cls, data: Any, path: str) -> InfluenceArguments:
        """Checked arguments from YAML data (types checked by the configuration kernel)."""
        return build(cls, data, path)
