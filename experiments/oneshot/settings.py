"""What ``nmtrain adaprune`` (and `nmtrain.oneshot`) is asked: the pattern, the method, its calibration and
its options, resolved into the method, its params and the fine-tune's, every value checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...sparsity import Pattern, get_solver
from .reconstruct import ReconstructParams
from .registry import ConversionError, OneShotMethod, field_names, flag, get_oneshot, make_params


@dataclass
class ConversionSettings:
    """What ``nmtrain adaprune`` is asked: the pattern, the method, its calibration and its options.

    ``options`` holds the method's and ``--finetune``'s choices by field name (``{"blocksize": 64}``), only
    those given: each goes to the params that have the field; one neither uses is refused."""
    pattern: Pattern
    method: str = "adaprune"
    calib_samples: int = 1000
    calib_seed: int = 0
    finetune: bool = False
    solver: str = "exact"       # the transposable solver of N:M-T masks
    options: dict = field(default_factory=dict)

    def resolve(self) -> tuple[OneShotMethod, Any, ReconstructParams | None]:
        """(the method, its params, the fine-tune's params or None), every value checked; one line on bad input."""
        for name, value, low in (("--calib-samples", self.calib_samples, 1), ("--calib-seed", self.calib_seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConversionError(f"{name}: must be an integer >= {low}, got {value!r}")
        try:
            get_solver(self.solver)
        except ValueError as exc:
            raise ConversionError(f"--solver: {exc}") from None
        method = get_oneshot(self.method)
        if self.finetune and method.reconstructs:
            raise ConversionError(f"--finetune: --method {method.name} already fits the kept weights; use --finetune "
                                  "with magnitude, wanda, sparsegpt or learned")
        used = field_names(method.params) | (field_names(ReconstructParams) if self.finetune else set())
        for name in self.options:
            if name not in used:
                hint = (" (it sets the fit of --method adaprune and of --finetune; add --finetune)"
                        if name in field_names(ReconstructParams) else "")
                raise ConversionError(f"{flag(name)}: --method {method.name} does not use it{hint}")
        params = make_params(method.params, self.options, self.pattern)
        finetune = make_params(ReconstructParams, self.options, self.pattern) if self.finetune else None
        return method, params, finetune
