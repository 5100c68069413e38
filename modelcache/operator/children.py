"""Make the cluster hold exactly the children a spec describes, idempotently.

Each child carries two annotations: the hash of the manifest the operator built and the
ModelCache generation it was built from. A child whose hash matches is left alone (no write,
so re-running a handler or restarting the operator changes nothing); a missing child is
created; a changed one is replaced. A child written from a newer generation is never
overwritten by a handler still holding an older body, and an object of the same name that
this ModelCache does not own is never touched: that is a conflict for the user to resolve.
PersistentVolumeClaims are immutable after creation (except growing), so they are created
once and only ever grown.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelcache.operator.builders import Manifest, digest
from modelcache.operator.kubeapi import Kube

APPLIED_HASH = "modelcache.io/applied-hash"
APPLIED_GENERATION = "modelcache.io/generation"
CREATED, UPDATED, UNCHANGED, SKIPPED = "created", "updated", "unchanged", "skipped"


class ChildConflict(RuntimeError):
    """An object with a child's name exists and belongs to something else."""


@dataclass(frozen=True)
class Applied:
    kind: str
    name: str
    action: str  # created | updated | unchanged | skipped
    previous_hash: str | None = None


def _annotations(obj: Manifest) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def _owned_by(obj: Manifest, uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs)


_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def _quantity(q: str) -> float:
    m = re.match(r"^([0-9.]+)([A-Za-z]*)$", str(q))
    return float(m.group(1)) * _UNITS.get(m.group(2), 1) if m else 0.0


def _grow_pvc(actual: Manifest, desired: Manifest) -> Manifest | None:
    """The PVC with a larger storage request, or None when nothing may change."""
    want = desired["spec"]["resources"]["requests"]["storage"]
    have = actual["spec"]["resources"]["requests"]["storage"]
    if _quantity(want) <= _quantity(have):
        return None
    grown = copy.deepcopy(actual)
    grown["spec"]["resources"]["requests"]["storage"] = want
    return grown


@dataclass(frozen=True)
class Plan:
    applied: Applied
    body: Manifest | None = None  # what to write; None: nothing
    create: bool = False


def plan_child(kube: Kube, desired: Manifest, owner_uid: str, generation: int) -> Plan:
    """Decide what one child needs, reading it but writing nothing."""
    kind, name, namespace = (
        desired["kind"],
        desired["metadata"]["name"],
        desired["metadata"]["namespace"],
    )
    body = copy.deepcopy(desired)
    wanted = digest(desired)
    ours = {APPLIED_HASH: wanted, APPLIED_GENERATION: str(generation)}
    body["metadata"].setdefault("annotations", {}).update(ours)
    actual = kube.read(kind, namespace, name)
    if actual is None:
        return Plan(Applied(kind, name, CREATED), body, create=True)
    if not _owned_by(actual, owner_uid):
        raise ChildConflict(
            f"{kind} {name} already exists and is not owned by this "
            "ModelCache: delete or rename it, or rename the ModelCache"
        )
    have = _annotations(actual)
    previous = have.get(APPLIED_HASH)
    if previous == wanted:
        return Plan(Applied(kind, name, UNCHANGED, previous))
    if int(have.get(APPLIED_GENERATION, "0") or 0) > generation:
        return Plan(Applied(kind, name, SKIPPED, previous))  # written from a newer spec
    if kind == "PersistentVolumeClaim":
        grown = _grow_pvc(actual, desired)
        if grown is None:
            return Plan(Applied(kind, name, SKIPPED, previous))
        grown["metadata"]["annotations"] = {**have, **ours}
        return Plan(Applied(kind, name, UPDATED, previous), grown)
    # Keep what others added (e.g. the Deployment controller's revision annotation).
    actual_meta = actual["metadata"]
    body["metadata"]["annotations"] = {**have, **ours}
    body["metadata"]["labels"] = {
        **(actual_meta.get("labels") or {}),
        **(body["metadata"].get("labels") or {}),
    }
    body["metadata"]["resourceVersion"] = actual_meta["resourceVersion"]
    if kind == "Service":
        # The allocated virtual IP is immutable: a replace must carry it over.
        for key in ("clusterIP", "clusterIPs"):
            if key in (actual.get("spec") or {}) and key not in body["spec"]:
                body["spec"][key] = actual["spec"][key]
    return Plan(Applied(kind, name, UPDATED, previous), body)


def _write(kube: Kube, plan: Plan, dry_run: bool) -> None:
    assert plan.body is not None
    if plan.create:
        kube.create(plan.body, dry_run=dry_run)
    else:
        kube.replace(plan.body, dry_run=dry_run)


def apply_all(
    kube: Kube,
    children: list[Manifest],
    owner_uid: str,
    generation: int,
    after_each: Callable[[Applied], Any] | None = None,
) -> list[Applied]:
    """Plan every child, dry-run every write, then write in order.

    The dry run makes the API server validate and admit all writes before the first real
    one, so a child it would refuse leaves no partial set behind. ``after_each`` sees each
    result (Events; the fault-injection test point).
    """
    plans = [plan_child(kube, child, owner_uid, generation) for child in children]
    writes = [p for p in plans if p.body is not None]
    for plan in writes:
        _write(kube, plan, dry_run=True)
    for plan in plans:
        if plan.body is not None:
            _write(kube, plan, dry_run=False)
        if after_each is not None:
            after_each(plan.applied)
    return [p.applied for p in plans]
