"""`--shard K/N`: a deterministic, cost-balanced part of a grid.

Comparison groups (cases that differ only in the method, see `gqbench.execute.group.group_key`) stay
whole, so every ratio is still taken side by side on one machine. Groups go, most expensive first,
to the shard with the least estimated cost so far (ties: the lower shard): every case lands in
exactly one shard, the same one on every machine that expands the same grid.
"""

from __future__ import annotations

import dataclasses
import re

from ..define.case import Case

# Rough relative cost of one gradient by method (the adjoint carries a parameter-sized state).
_METHOD_COST = {"torch_adjoint": 4.0, "torch_seminorm": 3.0, "jax_backsolve": 3.0}


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int  # 1-based, as written on the command line
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
            raise ValueError(f"--shard {text!r}: write K/N with 1 <= K <= N, e.g. --shard 1/4")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def case_cost(case: Case) -> float:
    """Relative cost: width^2 (the matmuls), more steps at tighter tolerances, the method's factor,
    training runs by their epochs."""
    steps = 1.0 + max(0.0, -_log10(case.rtol) - 3.0)  # 1 at rtol 1e-3, 4 at 1e-6
    cost = (case.width**2 + 1e3 * case.width) * steps * _METHOD_COST.get(case.method, 1.0)
    return cost * (case.epochs or 1)


def _log10(x: float) -> float:
    import math

    return math.log10(x) if x > 0 else 0.0


def assign(cases: list[Case], shard: Shard) -> list[Case]:
    """The cases of `shard`, in grid order."""
    from .group import comparison_groups

    groups = comparison_groups(cases)
    order = sorted(range(len(groups)), key=lambda i: (-sum(case_cost(c) for c in groups[i]), groups[i][0].case_id))
    load = [0.0] * shard.count
    mine: set[str] = set()
    for i in order:
        k = min(range(shard.count), key=lambda j: (load[j], j))
        load[k] += sum(case_cost(c) for c in groups[i])
        if k == shard.index - 1:
            mine.update(c.case_id for c in groups[i])
    return [c for c in cases if c.case_id in mine]
