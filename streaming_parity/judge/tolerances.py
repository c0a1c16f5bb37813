"""Loading the tolerance file and judging metric values against it.

A tolerance file is checked as it loads: a table or key the judge would never look up (a misspelled
dtype, pair, tap kind or metric) would otherwise leave its taps without limits, and a tap without
limits passes. For the same reason ``Tolerances.limits`` refuses to return no limits at all: every
tap that is compared must be bounded by at least one limit for its pair and dtype.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from streaming_parity.core.errors import InputNotFound, InvalidInput
from streaming_parity.interface.registry import dtypes as registered_dtypes
from streaming_parity.interface.taps import CACHE_TAPS, TAP_CTC, TAP_JOINT, TAP_MEL, TENSOR_TAP_KINDS, tap_kind
from streaming_parity.judge.metrics import METRIC_BOUND

DEFAULT_TOLERANCES = Path(__file__).resolve().parent / "tolerances.toml"
WILDCARD = "*"
# Every candidate precision a backend registers: a table for any other dtype is a misspelling.
DTYPES = registered_dtypes()
# The token sequence as a whole, judged by its agreement where a reduced-precision candidate may take
# other greedy decisions (streaming_parity/app/verify.py); only ``argmax_agreement`` applies to it.
TOKENS = "tokens"
TAP_KINDS = (*TENSOR_TAP_KINDS, *CACHE_TAPS, TOKENS)
# argmax_agreement is measured on logits (the joint, a hybrid's CTC head) and on token sequences only:
# a limit on it for any other tap would never be checked.
_AGREEMENT = "argmax_agreement"
_AGREEMENT_KINDS = (TAP_JOINT, TAP_CTC, TOKENS)
# power_rel is measured on the log-mel spectrogram only (streaming_parity.judge.metrics.power_rel).
_POWER = "power_rel"
# "reference~candidate", optionally for one lookahead: "streaming~offline@70,0", or for a right context at
# any left context: "streaming~offline@*,0".
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.:+-]*"
PAIR_RE = re.compile(rf"{_NAME}~{_NAME}(@(-?\d+|\*),-?\d+)?")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ToleranceFileError(InvalidInput):
    """The tolerance file is not one the judge can apply; the message names the file and the table."""


class MissingToleranceError(ToleranceFileError):
    """A compared tap has no limit for its pair and dtype: it would pass whatever it holds."""


@dataclass(frozen=True)
class Violation:
    metric: str
    value: float
    limit: float
    bound: str  # "max" or "min"

    def describe(self) -> str:
        relation = ">" if self.bound == "max" else "<"
        return f"{self.metric} = {self.value:.3g} {relation} limit {self.limit:.3g}"


def _key(name: str, quoted: bool = False) -> str:
    if _BARE_KEY.fullmatch(name) and not quoted:
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def table_name(*keys: str) -> str:
    """``[float32."nemo~onnx".layers]``: a table's name as the TOML file spells it (the pair quoted)."""
    return "[" + ".".join(_key(k, quoted=i == 1) for i, k in enumerate(keys)) + "]"


class Tolerances:
    def __init__(self, table: Mapping, source: str = "<memory>"):
        self.table = table
        self.source = source
        self._looked_up: dict[tuple[str, str, str], dict[str, float] | MissingToleranceError] = {}
        for keys, limits in self._tables(table, ()):
            self._validate(keys, limits)

    # -- validation -------------------------------------------------------------------------------------
    def _error(self, keys: tuple[str, ...], message: str) -> ToleranceFileError:
        where = table_name(*keys) if keys else "top level"
        return ToleranceFileError(f"{self.source}: {where}: {message}")

    def _tables(self, node: Mapping, keys: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Mapping]]:
        """Every ``[dtype."pair".kind]`` table, and every shallower table that has none below it."""
        if len(keys) == 3:
            yield keys, node
            return
        if not node and keys:
            yield keys, {}
        expected = ("a dtype table", "a pair table", "a tap kind table")[len(keys)]
        for key, child in node.items():
            if not isinstance(child, Mapping):
                raise self._error(keys, f"{key} = {child!r} where {expected} belongs "
                                        '(layout: [dtype."pair".tap_kind] metric = limit)')
            yield from self._tables(child, (*keys, key))

    def _validate(self, keys: tuple[str, ...], limits: Mapping) -> None:
        dtype, pair, kind = (*keys, None, None)[:3]
        if dtype not in DTYPES:
            raise self._error(keys, f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if pair is not None and pair != WILDCARD and not PAIR_RE.fullmatch(pair):
            raise self._error(keys, f"malformed pair {pair!r} (expected \"*\", \"A~B\", \"A~B@L,R\" or \"A~B@*,R\")")
        if kind is not None and kind not in TAP_KINDS:
            raise self._error(keys, f"unknown tap kind {kind!r} (known: {', '.join(TAP_KINDS)})")
        for metric, limit in limits.items():
            if metric not in METRIC_BOUND:
                raise self._error(keys, f"unknown metric {metric!r} (known: {', '.join(METRIC_BOUND)})")
            if kind == TOKENS and metric != _AGREEMENT:
                raise self._error(keys, f"{metric} is never measured for {TOKENS} (only {_AGREEMENT} is)")
            if metric == _AGREEMENT and kind not in _AGREEMENT_KINDS:
                raise self._error(keys, f"{metric} is never measured for {kind} "
                                        f"(only for {' and '.join(_AGREEMENT_KINDS)})")
            if metric == _POWER and kind != TAP_MEL:
                raise self._error(keys, f"{metric} is never measured for {kind} (only for {TAP_MEL})")
            if not isinstance(limit, int | float) or isinstance(limit, bool) or math.isnan(limit):
                raise self._error(keys, f"{metric} = {limit!r} is not a number")

    # -- loading and lookup -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None) -> Tolerances:
        path = Path(path) if path else DEFAULT_TOLERANCES
        try:
            with open(path, "rb") as handle:
                table = tomllib.load(handle)
        except FileNotFoundError:
            raise InputNotFound(f"tolerance file not found: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ToleranceFileError(f"{path}: not valid TOML ({error})") from None
        return cls(table, str(path))

    def limits(self, pair: str, dtype: str, tap: str) -> dict[str, float]:
        """Limits for a tap: the ``*`` table, overridden metric by metric by the pair's own.

        ``pair`` may carry a lookahead suffix (``streaming~offline@70,0``), which overrides the plain pair;
        a table for the right context at any left context (``streaming~offline@*,0``) sits between them.
        Raises ``MissingToleranceError`` when no table gives the tap a limit.
        """
        # Looked up once per (pair, dtype, tap): the judge asks for every tap at every step (a file is not
        # edited under a loaded Tolerances; its table is read once, at load).
        key = (pair, dtype, tap)
        if key not in self._looked_up:
            try:
                self._looked_up[key] = self._lookup(pair, dtype, tap)
            except MissingToleranceError as missing:
                self._looked_up[key] = missing
        found = self._looked_up[key]
        if isinstance(found, MissingToleranceError):
            raise MissingToleranceError(str(found))
        return dict(found)

    def _lookup(self, pair: str, dtype: str, tap: str) -> dict[str, float]:
        kind = tap_kind(tap)
        by_pair = self.table.get(dtype, {})
        base, _, context = pair.partition("@")
        any_left = f"{base}@*,{context.split(',', 1)[1]}" if context else None
        searched = [WILDCARD, *([base] if base != pair else []), *([any_left] if any_left else []), pair]
        limits: dict[str, float] = {}
        for key in searched:
            limits.update(by_pair.get(key, {}).get(kind, {}))
        if not limits:
            tables = ", ".join(table_name(dtype, key, kind) for key in searched)
            raise MissingToleranceError(f"{self.source}: no limit for tap {tap!r} of {pair} at {dtype} "
                                        f"(looked in {tables}); every compared tap needs one")
        return limits

    def limit(self, pair: str, dtype: str, tap: str, metric: str) -> float:
        """One metric's limit for a tap (``limits``); raises ``MissingToleranceError`` when the tables that
        bound the tap give it none, so that a check which needs that metric never runs on a default."""
        limits = self.limits(pair, dtype, tap)
        if metric not in limits:
            raise MissingToleranceError(f"{self.source}: no {metric} limit for tap {tap!r} of {pair} at {dtype} "
                                        f"(it has {', '.join(sorted(limits))})")
        return float(limits[metric])

    def check(self, metrics: Mapping[str, float], limits: Mapping[str, float]) -> list[Violation]:
        violations = []
        for metric, limit in limits.items():
            if metric not in metrics:
                continue
            value = metrics[metric]
            bound = METRIC_BOUND[metric]
            bad = math.isnan(value) or (value > limit if bound == "max" else value < limit)
            if bad:
                violations.append(Violation(metric, value, limit, bound))
        return violations
