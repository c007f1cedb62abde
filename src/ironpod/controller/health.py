"""The controller's health policy: what a node's health results mean for it and its job.

Agents report rows (:class:`ironpod.health.CheckResult`); this module decides, inside the
controller's lock, on the controller's session:

- every run's rows replace ``node.health`` (by check name: a list of rows, one per target);
- a ``fail`` row, with ``health_action="quarantine"`` (the default), quarantines the node with
  a reason naming the check, its value and threshold, and fails the attempt the node runs with
  fault kind ``unhealthy``, blaming the node, so the job restarts on a free node or a spare;
  with ``"label"`` (HyperPod's ``NodeRecovery: None``) the result is recorded and announced by
  an event and nothing else happens;
- a node quarantined by this policy returns to ``ready`` (event ``node_recovered``) on its first
  run without a ``fail`` once ``health_recheck_after_s`` have passed, unless it was found
  unhealthy ``health_repeat_limit`` times within ``health_repeat_window_s``: such a repeat
  offender stays out until an operator runs ``ironpod undrain``.

Only nodes this policy quarantined are released by a passing run. A node blamed too often
(hangs, losses, agent restarts; see ironpod.controller.policy) with a deep recheck pending
(``node.recheck_unix``) is settled by ``recovery.settle_recheck`` instead: its first run after
the request decides, and a failure hands it to this policy as a health quarantine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ironpod.controller.db import Event, Node
from ironpod.controller.policy import Fault
from ironpod.errors import ConfigError
from ironpod.health import CheckResult, Status, worst
from ironpod.states import NodeState

if TYPE_CHECKING:
    from ironpod.controller.service import Controller

HealthAction = Literal["quarantine", "label"]
#: ``node.reason`` of a node this policy quarantined starts with this.
REASON_PREFIX = "unhealthy: "
#: States a failing node is quarantined from (draining and drained nodes are only labelled:
#: an operator already took them out).
_QUARANTINABLE = {
    NodeState.JOINING,
    NodeState.READY,
    NodeState.BUSY,
    NodeState.SUSPECT,
    NodeState.LOST,
}


def parse_action(text: str) -> HealthAction:
    if text not in ("quarantine", "label"):
        raise ConfigError(f"--health-action {text!r}: expected quarantine or label")
    return cast(HealthAction, text)


def describe(row: CheckResult) -> str:
    """``system.disk_free /x: 0.002 GiB (threshold 0.0078 GiB): ...``: what failed, by how much."""
    what = f"{row.check} {row.target}".strip()
    if row.value is not None and row.threshold is not None:
        what += f": {row.value:.4g} {row.unit} (threshold {row.threshold:.4g} {row.unit})".replace(
            "  ", " "
        )
    return f"{what}: {row.message}" if row.message else what


def by_check(results: list[CheckResult]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in results:
        out.setdefault(row.check, []).append(row.model_dump(mode="json"))
    return out


def apply_health(ctl: Controller, s: Session, node: Node, results: list[CheckResult]) -> None:
    """Record one finished health run of ``node`` and act on it (see the module docstring)."""
    config = ctl.config
    node.health = {
        **by_check(results),
        "_run": {"time_unix": ctl.clock(), "status": worst(results)},
    }
    failed = [r for r in results if r.status == Status.FAIL]
    state = NodeState(node.state)
    if node.recheck_unix is not None and state in {NodeState.SUSPECT, NodeState.QUARANTINED}:
        return  # the deep recheck of a node blamed too often: recovery.settle_recheck decides
    if not failed:
        if state == NodeState.QUARANTINED and node.reason.startswith(REASON_PREFIX):
            _maybe_recover(ctl, s, node)
        return
    reason = REASON_PREFIX + "; ".join(describe(r) for r in failed)
    if state == NodeState.QUARANTINED:
        if node.reason.startswith(REASON_PREFIX) and "`ironpod undrain`" not in node.reason:
            node.reason = reason  # still failing: the newest numbers, no new event
        return
    acted = config.health_action == "quarantine" and state in _QUARANTINABLE
    ctl._event(
        s,
        "node_unhealthy",
        reason,
        node=node,
        action=config.health_action if acted else "label",
        results=[r.model_dump(mode="json") for r in failed],
    )
    if not acted:
        return
    ctl._set_node(s, node, NodeState.QUARANTINED, reason)
    ctl._fail_node_attempt(s, node, f"node {node.name} {reason}", Fault.UNHEALTHY)


def _maybe_recover(ctl: Controller, s: Session, node: Node) -> None:
    config = ctl.config
    since = _last_quarantine(s, node)
    if since is not None and ctl.clock() - since < config.health_recheck_after_s:
        return
    offences = _offences(s, node, ctl.clock() - config.health_repeat_window_s)
    if offences >= config.health_repeat_limit:
        cause = (
            f"{offences} health failures within {config.health_repeat_window_s:.0f} s: "
            "stays quarantined until `ironpod undrain`"
        )
        if "until `ironpod undrain`" not in node.reason:
            node.reason = f"{node.reason} ({cause})"
            ctl._event(s, "node_repeat_offender", cause, node=node, offences=offences)
        return
    ctl._set_node(s, node, NodeState.READY, "health recheck passed")
    ctl._event(s, "node_recovered", "health recheck passed", node=node, offences=offences)


def _last_quarantine(s: Session, node: Node) -> float | None:
    found = s.scalar(
        select(func.max(Event.time_unix)).where(
            Event.node_id == node.id, Event.kind == f"node_{NodeState.QUARANTINED}"
        )
    )
    return float(found) if found is not None else None


def _offences(s: Session, node: Node, window_start: float) -> int:
    """``node_unhealthy`` events that quarantined the node within the window, after the last
    time an operator returned it (``undrain`` forgives)."""
    forgiven = s.scalar(  # by id, not time: events of one clock tick keep their order
        select(func.max(Event.id)).where(
            Event.node_id == node.id,
            Event.kind == f"node_{NodeState.READY}",
            Event.cause == "returned by a user",
        )
    )
    rows = s.scalars(
        select(Event.data).where(
            Event.node_id == node.id,
            Event.kind == "node_unhealthy",
            Event.time_unix >= window_start,
            Event.id > (forgiven or 0),
        )
    )
    return sum(1 for data in rows if (data or {}).get("action") == "quarantine")
