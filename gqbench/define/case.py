"""`Case`: a frozen description of *what* one measurement runs (kept apart from the samples)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

# Columns a case contributes to every results row, in this order.
CASE_FIELDS = (
    "method",
    "problem",
    "width",
    "batch",
    "rtol",
    "atol",
    "quadrature",
    "gtol",
    "quad_order",
    "backward_state",
    "warm_start",
    "solver",
    "device",
    "dtype",
    "seed",
    "threads",
    "epochs",
    "ncosines",
    "lr",
    "train_steps",
    "weights",
)
# Fields that make a case's method what it is; cases equal in the rest are timed side by side.
METHOD_FIELDS = ("method", "quadrature", "gtol", "quad_order", "backward_state", "warm_start")
# The fields of the experiment methods are compared on (one gradient measurement; training runs add
# epochs, ncosines and lr).
MATCH = ["problem", "width", "batch", "rtol", "atol", "solver", "device", "dtype", "seed", "threads", "train_steps",
         "weights"]  # fmt: skip
# Methods whose speed-up over the others is what gqbench reports.
QUAD_METHODS = ("torch_gq", "jax_gq")


@dataclasses.dataclass(frozen=True)
class Case:
    """One point of the grid. Quadrature fields are None for methods they do not apply to.

    `case_id` hashes the canonical JSON of the fields, so it is stable across processes,
    Python versions and machines (unlike `hash()`).
    """

    method: str
    problem: str
    width: int
    batch: int
    rtol: float = 1e-6
    atol: float = 1e-6
    quadrature: str | None = None  # GQ: "adaptive", "gtol" (the paper's rule) or "fixed" (quad_order)
    gtol: float | None = None
    quad_order: int | None = None
    backward_state: str | None = None
    warm_start: bool | None = None
    solver: str = "dopri5"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    threads: int = 2
    epochs: int | None = None  # set: a training run (gqbench.training), else one gradient measurement
    ncosines: int | None = None  # Wong–Zakai noise terms (torch_gq on SDE training problems)
    lr: float | None = None  # Adam's learning rate (training problems that take it from the case)
    # One gradient at the weights after this many steps of `gqbench.measurement.trained`'s fixed recipe
    # (0: the problem's initial weights, as before the axis existed).
    train_steps: int = 0
    # A user's own weights for `func` (`gqbench advise --weights`): 16 hex digits of the file's sha256; the
    # file is copied into the references folder as weights-<this>.pt. "": the problem's own initial weights.
    weights: str = ""

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in CASE_FIELDS}

    @classmethod
    def from_dict(cls, data: dict) -> Case:
        fields = {f: data[f] for f in CASE_FIELDS if f in data}
        for late in ("train_steps", "weights"):  # older rows: missing or NaN
            if fields.get(late) is None or fields[late] != fields[late]:
                fields.pop(late, None)
        if "train_steps" in fields:
            fields["train_steps"] = int(fields["train_steps"])
        return cls(**fields)

    @property
    def case_id(self) -> str:
        canon = {k: (float(v) if isinstance(v, float) else v) for k, v in self.to_dict().items()}
        # Fields added after the first release hash only when set, so earlier ids stay valid.
        for late in ("warm_start", "quadrature", "epochs", "ncosines", "lr", "train_steps", "weights"):
            # warm_start=False (cold, no longer the default) hashes; None hashes like before.
            if canon[late] is None or (not canon[late] and late != "warm_start"):
                del canon[late]
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """Method plus its quadrature setting, e.g. `torch_gq[n=4,interpolate]`; a plot legend entry."""
        opts = []
        if self.quadrature == "adaptive":
            opts.append("adaptive")
        elif self.quad_order is not None:
            opts.append(f"n={self.quad_order}")
        elif self.gtol is not None and not (isinstance(self.gtol, float) and math.isnan(self.gtol)):
            opts.append(f"gtol={self.gtol:g}")
        if self.backward_state not in (None, "auto"):  # the default goes unnamed
            opts.append(self.backward_state)
        if self.warm_start is False:  # warm starts are the default
            opts.append("cold")
        if self.ncosines is not None:
            opts.append(f"nc={self.ncosines}")
        return f"{self.method}[{','.join(opts)}]" if opts else self.method

    @property
    def reference_key(self) -> tuple:
        """Cases sharing this key share one float64 reference gradient (and, trained, one trained state:
        the weights depend on the dtype and device they were trained in)."""
        if self.train_steps or self.weights:
            return (self.problem, self.width, self.batch, self.seed, self.train_steps, self.dtype, self.device,
                    self.weights)  # fmt: skip
        return (self.problem, self.width, self.batch, self.seed)

    def with_(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)
