"""Loading the tolerance file and judging metric values against it."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from harness.metrics import METRIC_BOUND

DEFAULT_TOLERANCES = Path(__file__).resolve().parent / "tolerances.toml"
WILDCARD = "*"


def tap_kind(tap: str) -> str:
    """``layers.7`` -> ``layers``; every other tap name is its own kind."""
    return tap.split(".", 1)[0]


@dataclass(frozen=True)
class Violation:
    metric: str
    value: float
    limit: float
    bound: str  # "max" or "min"

    def describe(self) -> str:
        relation = ">" if self.bound == "max" else "<"
        return f"{self.metric} = {self.value:.3g} {relation} limit {self.limit:.3g}"


class Tolerances:
    def __init__(self, table: Mapping, source: str = "<memory>"):
        self.table = table
        self.source = source
        for dtype, pairs in table.items():
            for pair, kinds in pairs.items():
                for kind, limits in kinds.items():
                    for metric in limits:
                        if metric not in METRIC_BOUND:
                            raise ValueError(f"{source}: [{dtype}.\"{pair}\".{kind}] names unknown metric {metric!r}")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Tolerances":
        path = Path(path) if path else DEFAULT_TOLERANCES
        try:
            with open(path, "rb") as handle:
                table = tomllib.load(handle)
        except FileNotFoundError:
            raise FileNotFoundError(f"tolerance file not found: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML ({error})") from None
        return cls(table, str(path))

    def limits(self, pair: str, dtype: str, tap: str) -> dict[str, float]:
        """Limits for a tap: the ``*`` table, overridden metric by metric by the pair's own.

        ``pair`` may carry a lookahead suffix (``streaming~offline@70,0``), which overrides the plain pair.
        """
        kind = tap_kind(tap)
        by_pair = self.table.get(dtype, {})
        limits = dict(by_pair.get(WILDCARD, {}).get(kind, {}))
        base = pair.split("@", 1)[0]
        if base != pair:
            limits.update(by_pair.get(base, {}).get(kind, {}))
        limits.update(by_pair.get(pair, {}).get(kind, {}))
        return limits

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
