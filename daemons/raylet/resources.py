"""Resource accounting in fixed point, so 0.1 + 0.2 CPUs never drifts.

Quantities are stored as integers in units of 1/10000 (Ray uses the same
scale), which makes fractional demands such as ``num_gpus=0.25`` exact.
"""

from __future__ import annotations

from collections.abc import Mapping

SCALE = 10_000


def to_units(amount: float) -> int:
    return round(float(amount) * SCALE)


def from_units(units: int) -> float:
    value = units / SCALE
    return int(value) if value == int(value) else value


class ResourceSet:
    """An immutable-by-convention map from resource name to fixed-point amount."""

    __slots__ = ("_units",)

    def __init__(self, units: Mapping[str, int] | None = None) -> None:
        self._units = {k: v for k, v in (units or {}).items() if v != 0}

    @classmethod
    def of(cls, amounts: Mapping[str, float]) -> ResourceSet:
        """Build from user amounts; raises ValueError on negative or non-numeric ones."""
        units = {}
        for name, amount in amounts.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"resource name {name!r} must be a non-empty string")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)):
                raise ValueError(f"resource {name} amount {amount!r} is not a number")
            if amount < 0:
                raise ValueError(f"resource {name} amount {amount} is negative")
            units[name] = to_units(amount)
        return cls(units)

    def to_dict(self) -> dict[str, float]:
        return {k: from_units(v) for k, v in self._units.items()}

    def get(self, name: str) -> int:
        return self._units.get(name, 0)

    def fits_in(self, other: ResourceSet) -> bool:
        """True if every amount here is available in ``other``."""
        return all(other._units.get(k, 0) >= v for k, v in self._units.items())

    def __add__(self, other: ResourceSet) -> ResourceSet:
        out = dict(self._units)
        for k, v in other._units.items():
            out[k] = out.get(k, 0) + v
        return ResourceSet(out)

    def __sub__(self, other: ResourceSet) -> ResourceSet:
        out = dict(self._units)
        for k, v in other._units.items():
            out[k] = out.get(k, 0) - v
        return ResourceSet(out)

    def only(self, names: tuple[str, ...]) -> ResourceSet:
        return ResourceSet({k: v for k, v in self._units.items() if k in names})

    def names(self) -> list[str]:
        return list(self._units)

    def without(self, names: object) -> ResourceSet:
        """A copy without the resources named in ``names`` (any container)."""
        return ResourceSet({k: v for k, v in self._units.items() if k not in names})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResourceSet) and other._units == self._units

    def __repr__(self) -> str:
        return f"ResourceSet({self.to_dict()})"


class GpuInstances:
    """Which GPU indices a lease holds, for CUDA_VISIBLE_DEVICES.

    Whole-GPU demands take whole free GPUs (lowest index first); a fractional
    demand (< 1) packs onto the first GPU with that much left, as Ray does.
    Not thread-safe.
    """

    def __init__(self, count: int) -> None:
        self._free = [SCALE] * count

    def acquire(self, units: int) -> list[int] | None:
        if units <= 0:
            return []
        if units < SCALE:
            for i, free in enumerate(self._free):
                if free >= units:
                    self._free[i] -= units
                    return [i]
            return None
        whole = -(-units // SCALE)
        idle = [i for i, free in enumerate(self._free) if free == SCALE][:whole]
        if len(idle) < whole:
            return None
        for i in idle:
            self._free[i] = 0
        return idle

    def release(self, ids: list[int], units: int) -> None:
        if not ids:
            return
        if units < SCALE:
            self._free[ids[0]] = min(SCALE, self._free[ids[0]] + units)
        else:
            for i in ids:
                self._free[i] = SCALE
