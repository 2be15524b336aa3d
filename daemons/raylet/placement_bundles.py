"""A node's side of placement groups: bundles it has locked (prepared) or made its own (committed).

Theory of operation
  A coordinator asks this node to *prepare* bundle ``i`` of group ``g``: if
  the resources are free now they are locked (taken from the node's free
  resources; the scheduler will not grant them), else the answer is no.
  *Commit* then adds the bundle's own resources, named as Ray names them,
  to the node's total and free resources:

  * ``CPU_group_<i>_<g>`` and ``CPU_group_<g>`` (likewise for every
    resource of the bundle), for work pinned to bundle ``i`` or to any
    bundle of ``g``;
  * ``bundle_group_<i>_<g>`` and ``bundle_group_<g>`` (1000 each), of which
    every task or actor in the group takes 0.001, so work that asks for no
    resource at all (an actor's default) is still held to the bundle's node.

  The physical resources stay locked while the bundle lives: ``CPU`` keeps
  its total and shows the bundle as in use, as in Ray. *Return* undoes a
  prepare or a commit. Every call is idempotent (a coordinator may repeat
  itself after a lost reply). This class only does the arithmetic; the
  raylet shell applies it to its scheduler and ends the leases that use a
  returned bundle. No I/O. Not thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemons.raylet.resources import ResourceSet
from libclient.util.placement_group import BUNDLE_UNITS, group_resources

PREPARED = "PREPARED"
COMMITTED = "COMMITTED"


@dataclass
class Reservation:
    resources: ResourceSet   # what the bundle asked for (locked from the node)
    state: str


@dataclass(frozen=True)
class Change:
    """What the shell applies to its scheduler.

    Args:
        acquire: physical resources to take from the free ones (prepare).
        release: physical resources to give back to the free ones (return).
        add: group resources to add to total and free (commit).
        remove: group resources to drop from total and free (return of a
            committed bundle; the shell ends the leases holding any first).
    """

    acquire: ResourceSet = field(default_factory=ResourceSet)
    release: ResourceSet = field(default_factory=ResourceSet)
    add: ResourceSet = field(default_factory=ResourceSet)
    remove: ResourceSet = field(default_factory=ResourceSet)


class BundleHost:
    """The bundles reserved on this node, by (group id, bundle index)."""

    def __init__(self) -> None:
        self.bundles: dict[tuple[bytes, int], Reservation] = {}

    def prepare(self, pg_id: bytes, index: int, resources: ResourceSet,
                available: ResourceSet) -> Change | None:
        """Lock ``resources`` if they are free now; None (refused) otherwise."""
        _check(pg_id, index)
        have = self.bundles.get((pg_id, index))
        if have is not None:
            return Change()  # asked again: already ours
        if not resources.to_dict() or not resources.fits_in(available):
            return None
        self.bundles[(pg_id, index)] = Reservation(resources, PREPARED)
        return Change(acquire=resources)

    def commit(self, pg_id: bytes, index: int) -> Change | None:
        """Make a prepared bundle's resources usable; None if it was never prepared here."""
        _check(pg_id, index)
        r = self.bundles.get((pg_id, index))
        if r is None:
            return None
        if r.state == COMMITTED:
            return Change()
        r.state = COMMITTED
        return Change(add=self.group_resources(pg_id, index, r.resources))

    def give_back(self, pg_id: bytes, index: int) -> Change:
        """Return a prepared or committed bundle (nothing if unknown)."""
        _check(pg_id, index)
        r = self.bundles.pop((pg_id, index), None)
        if r is None:
            return Change()
        if r.state == PREPARED:
            return Change(release=r.resources)
        return Change(release=r.resources,
                      remove=self.group_resources(pg_id, index, r.resources))

    def indices(self, pg_id: bytes) -> list[int]:
        """Bundles of ``pg_id`` held here."""
        return sorted(i for (g, i) in self.bundles if g == pg_id)

    def groups(self) -> set[bytes]:
        return {g for (g, _) in self.bundles}

    @staticmethod
    def group_resources(pg_id: bytes, index: int, resources: ResourceSet) -> ResourceSet:
        return ResourceSet.of(group_resources(pg_id.hex(), index, resources.to_dict()))


def _check(pg_id: object, index: object) -> None:
    if not isinstance(pg_id, bytes) or not pg_id:
        raise ValueError("placement group id must be non-empty bytes")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"bundle index {index!r} must be an int >= 0")


__all__ = ["BUNDLE_UNITS", "BundleHost", "Change", "Reservation"]
