"""What a value may be: a number's range (`Rule`) or a word's choices (`Choice`), declared on its field.

A spec section or a method's parameters are dataclasses; ``param(default, rule=..., choice=...)`` puts
the rule on the field itself (its metadata), so a parameter and what it may be are read in one place.
`spec.from_dict` checks every field against its rule when YAML data becomes a dataclass, before anything
is built or written. This module imports nothing heavy: `cli/` and the spec can read it without torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """The range a number must lie in; ``note`` says what it means or what null does, for the message.
    Every float must also be finite: YAML reads .nan and .inf, and float("nan") takes the string."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False       # lo itself is out (a width of 0)
    hi_open: bool = False       # hi itself is out (momentum 1.0, seed 2**63)
    note: str = ""

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((value > self.lo if self.lo_open else value >= self.lo)
                and (value < self.hi if self.hi_open else value <= self.hi))

    def says(self) -> str:
        lo, hi = _shown(self.lo), _shown(self.hi)
        if self.hi == math.inf:
            return "" if self.lo == -math.inf else f"above {lo}" if self.lo_open else f"at least {lo}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _shown(x: float) -> str:
    if isinstance(x, int) and x >= 2 ** 32 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}"


def at_least(lo: int, note: str = "") -> Rule:
    return Rule(lo=lo, note=note)


def above(lo: float, note: str = "") -> Rule:
    return Rule(lo=lo, lo_open=True, note=note)


# torch.manual_seed and torch.Generator take seeds below 2**64, random.seed any integer; the runner and the
# data add small offsets (seed + epoch for each epoch's shuffle, seed + 1 for the test subset), so a seed
# below 2**63 leaves them room.
SEED = Rule(lo=0, hi=2 ** 63, hi_open=True)
FRACTION = Rule(lo=0, hi=1, note="(a fraction of the total steps)")
STEPS = at_least(1, "(steps)")
DECAY = at_least(0, "(weight decay on pruned weights)")     # every method's `decay`: one meaning


@dataclass(frozen=True)
class Choice:
    """The words a string field may be. Two wordings, as the messages have always read: ``listed``
    gives "must be one of a, b, got 'x'"; otherwise "'x' is unknown; use a, b or c"."""
    values: tuple[str, ...]
    listed: bool = False

    def refusal(self, key: str, value: str) -> str | None:
        """The one-line message refusing ``value`` for the field ``key``; None when it is one of the choices."""
        if value in self.values:
            return None
        if self.listed:
            return f"{key}: must be one of {', '.join(self.values)}, got {value!r}"
        words = ", ".join(self.values[:-1]) + f" or {self.values[-1]}" if len(self.values) > 1 else self.values[0]
        return f"{key}: {value!r} is unknown; use {words}"


def param(default: Any = dataclasses.MISSING, rule: Rule | None = None, choice: Choice | None = None, *,
          default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its default (or ``default_factory``, for a list) and what it may be (a
    number's `Rule`, a word's `Choice`)."""
    metadata = {k: v for k, v in (("rule", rule), ("choice", choice)) if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def rules_by_path(cls: type, where: str = "") -> dict[str, Rule]:
    """Every field rule of a dataclass tree, by dotted path (``optim.lr``); nested dataclasses are
    followed through their fields' default factories."""
    found = {}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if rule_of(f) is not None:
            found[key] = rule_of(f)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            found.update(rules_by_path(f.default_factory, key))
    return found


def rule_of(f: dataclasses.Field) -> Rule | None:
    return f.metadata.get("rule")


def choice_of(f: dataclasses.Field) -> Choice | None:
    return f.metadata.get("choice")
