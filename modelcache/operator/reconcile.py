"""One convergence of one ModelCache: validate, apply the children, observe, derive status.

Every handler (create, update, resume, the status timer) runs this same function, so there
is one path to reason about and re-running it is always safe. A spec that fails the deeper
checks, or children the API server would reject (found by a server-side dry run of every
write before the first real one), leave the cluster untouched: no partial children.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from modelcache.config import ConfigError
from modelcache.operator import builders, children, probe
from modelcache.operator.builders import Owner
from modelcache.operator.events import Event, transitions
from modelcache.operator.kubeapi import Kube
from modelcache.operator.pods import PENDING, PodView, Problem, classify_pod
from modelcache.operator.settings import OperatorSettings
from modelcache.operator.spec import ModelCacheSpec, SpecError, parse_spec, with_defaults
from modelcache.operator.status import CacheStatus, Observation, derive_status

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: CacheStatus
    events: list[Event] = field(default_factory=list)
    applied: list[children.Applied] = field(default_factory=list)
    rejected: bool = False  # the spec (or a child the API server refused) needs a fix


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _child_event(applied: children.Applied, config_hash: str) -> Event | None:
    if applied.action == children.CREATED:
        return Event("Normal", "Created", f"created {applied.kind} {applied.name}")
    if applied.action == children.UPDATED:
        note = {
            "Deployment": ": rolling out new pods",
            "ConfigMap": f": config {config_hash}, applied live by the running daemons",
        }.get(applied.kind, "")
        return Event("Normal", "Updated", f"updated {applied.kind} {applied.name}{note}")
    return None


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings) -> None:
        self.kube = kube
        self.settings = settings

    def _fault_point(self, applied: children.Applied) -> None:
        """Testing only: crash right after a write, like a killed operator would."""
        if applied.kind == self.settings.fault_exit_after and applied.action in (
            children.CREATED,
            children.UPDATED,
        ):
            print(f"fault_exit_after={applied.kind}: exiting", file=sys.stderr, flush=True)
            os._exit(17)

    def converge(self, body: Mapping[str, Any], apply: bool = True) -> Outcome:
        """Validate, apply the children (unless ``apply`` is false), observe, derive."""
        meta = body["metadata"]
        owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        generation = int(meta.get("generation", 1))
        previous: Mapping[str, Any] = body.get("status") or {}
        observed = previous.get("observedGeneration")
        events: list[Event] = []
        applied: list[children.Applied] = []
        spec: ModelCacheSpec | None = None
        error, reason = None, "InvalidSpec"
        try:
            spec = parse_spec(
                owner.name, with_defaults(body.get("spec") or {}, self.settings.daemon_defaults)
            )
            manifests = builders.build_children(spec, owner)
        except (SpecError, ConfigError) as exc:
            spec, error = None, str(exc)
        if spec is not None and apply:
            try:
                applied = children.apply_all(
                    self.kube, manifests, owner.uid, generation, after_each=self._fault_point
                )
                observed = generation
            except children.ChildConflict as exc:
                spec, error, reason = None, str(exc), "ChildConflict"
            except ApiException as exc:
                if exc.status not in (400, 422):
                    raise
                spec, error, reason = None, _rejection(exc), "ChildRejected"
            except ValidationError as exc:  # the client's own schema refused a child
                lines = str(exc).splitlines()
                spec, error, reason = None, "; ".join(lines[:3]), "ChildRejected"
        if spec is None:
            observed = generation  # looked at, and refused: the status says why
        # The config the children carry: the new one once applied, else the last applied.
        config_hash = (
            builders.config_hash(spec)
            if spec is not None and observed == generation
            else previous.get("configHash")
        )
        for a in applied:
            event = _child_event(a, config_hash or "")
            if event is not None:
                events.append(event)
        status = self.observe(owner, spec, error, reason, observed, previous, config_hash)
        events.extend(transitions(previous, status))
        return Outcome(status, events, applied, rejected=spec is None)

    def _explain_stuck(self, namespace: str, views: list[PodView]) -> list[PodView]:
        """A pod that has not started, with no reason in its own status (ContainerCreating
        on a missing Secret, FailedMount, a sandbox that cannot be created): its newest
        Warning Event says why."""
        stuck = {v.name for v in views if v.stage == PENDING and v.problem is None}
        if not stuck:
            return views
        try:
            warnings = self.kube.pod_warnings(namespace, stuck)
        except ApiException as exc:  # an explanation is a nicety: never fail the status
            log.info("cannot list Events in %s: %s", namespace, exc.reason)
            return views
        return [
            replace(v, problem=Problem(*warnings[v.name])) if v.name in warnings else v
            for v in views
        ]

    def _probe_tls(self, owner: Owner, spec: ModelCacheSpec) -> probe.ProbeTls | None:
        """TLS settings for ListModels from spec.tls's Secret (read on every probe, so a
        rotated certificate is picked up)."""
        if spec.tls is None:
            return None
        host = builders.endpoint(owner, spec, self.settings.cluster_domain)
        server_name = host.removeprefix("dns:///").rsplit(":", 1)[0]
        data = self.kube.secret_data(owner.namespace, spec.tls.secret_name)
        return probe.tls_from_secret(data, spec.tls.secret_name, spec.tls.client_auth, server_name)

    def observe(
        self,
        owner: Owner,
        spec: ModelCacheSpec | None,
        error: str | None,
        reason: str,
        observed: int | None,
        previous: Mapping[str, Any],
        config_hash: str | None,
    ) -> CacheStatus:
        """Read the Deployment and pods, ask running daemons, and derive the status."""
        deployment, views, answers = None, [], {}
        if spec is not None:
            deployment = self.kube.read("Deployment", owner.namespace, owner.name)
            current = builders.template_hash(spec, owner)
            pods = self.kube.list_pods(owner.namespace, builders.selector_labels(owner.name))
            views = [
                classify_pod(p, current)
                for p in pods
                if not (p.get("metadata") or {}).get("deletionTimestamp")
            ]
            views = self._explain_stuck(owner.namespace, views)
            running = [(v.name, v.pod_ip) for v in views if v.current and v.daemon_running]
            targets = probe.targets(running, spec.ports.grpc, self.settings.daemon_address_override)
            tls = self._probe_tls(owner, spec) if targets else None
            answers = probe.list_models(targets, self.settings.probe_timeout, tls)
            for pod, answer in answers.items():
                if answer.error:
                    log.info("ListModels on pod %s failed: %s", pod, answer.error)
        endpoint = (
            builders.endpoint(owner, spec, self.settings.cluster_domain)
            if spec is not None
            else previous.get("endpoint")
        )
        return derive_status(
            Observation(
                spec=spec,
                spec_error=error,
                error_reason=reason,
                observed_generation=observed,
                deployment=deployment,
                pods=views,
                answers=answers,
                previous=previous,
                now=_now(),
                endpoint=endpoint,
                config_hash=config_hash,
                selector=(
                    ",".join(f"{k}={v}" for k, v in builders.selector_labels(owner.name).items())
                    if spec is not None
                    else None
                ),
            )
        )


def _rejection(exc: ApiException) -> str:
    """The API server's reason for refusing a child (a 422 body names the field)."""
    try:
        message = str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        message = str(exc.reason)
    return f"the API server rejected a child object: {message}"
