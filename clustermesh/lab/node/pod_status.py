"""The Pod status a kubelet reports, from what its containers are doing: each container's state,
the phase, the conditions (PodScheduled, Initialized, ContainersReady, Ready, with transition times
kept from the previous status), as Kubernetes 1.20's kubelet does. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


@dataclass
class ContainerState:
    """What the node agent knows of one container; the status is built from it."""

    name: str
    image: str
    container_id: str = ""
    running_since: str | None = None  # RFC 3339
    waiting: tuple[str, str] | None = ("ContainerCreating", "")  # (reason, message)
    terminated: Obj | None = None  # exitCode, reason, startedAt, finishedAt, ...
    last_terminated: Obj | None = None
    restart_count: int = 0
    ready: bool = False
    started: bool = False


@dataclass
class PodState:
    containers: list[ContainerState] = field(default_factory=list)
    init_containers: list[ContainerState] = field(default_factory=list)
    init_done: bool = True
    pod_ip: str = ""
    host_ip: str = ""
    start_time: str = ""


def _progress(c: ContainerState) -> str:
    """How the phase counts a container: running; stopped (exited, or waiting to start again
    after an exit); or waiting (never started yet)."""
    if c.running_since:
        return "running"
    if c.terminated is not None or c.last_terminated is not None:
        return "stopped"
    return "waiting"


def phase(pod: Obj, state: PodState) -> str:
    """Pending until every container has started; Running while one runs, or while all have
    exited and will be restarted; Succeeded/Failed once all have exited for good."""
    policy = pod.get("spec", {}).get("restartPolicy") or "Always"
    if policy == "Never" and any(c.terminated is not None and c.terminated.get("exitCode") != 0
                                 for c in state.init_containers):
        return "Failed"  # an init container failed and will not be retried
    progress = [_progress(c) for c in state.containers]
    if not state.init_done or "waiting" in progress or not progress:
        return "Pending"
    if "running" in progress or policy == "Always":
        return "Running"
    # A container waiting to start again has not succeeded, whatever its last exit code.
    if all(c.terminated is not None and c.terminated.get("exitCode") == 0 for c in state.containers):
        return "Succeeded"
    return "Failed" if policy == "Never" else "Running"


def _readiness(state: PodState, phase_: str) -> tuple[bool, str, str]:
    """(ready, reason, message), shared by the ContainersReady and Ready conditions."""
    if not state.containers:
        return False, "UnknownContainerStatuses", ""
    if phase_ == "Succeeded":
        return False, "PodCompleted", ""
    unready = [c.name for c in state.containers if not c.ready]
    if unready:
        return False, "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]"
    return True, "", ""


def _condition(kind: str, ok: bool, since: str, reason: str = "", message: str = "") -> Obj:
    cond: Obj = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                 "lastTransitionTime": since}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def container_status(c: ContainerState) -> Obj:
    state: Obj
    if c.running_since:
        state = {"running": {"startedAt": c.running_since}}
    elif c.terminated is not None:
        state = {"terminated": c.terminated}
    else:
        reason, message = c.waiting or ("ContainerCreating", "")
        state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
    out: Obj = {
        "name": c.name, "image": c.image, "imageID": f"lab-catalog://{c.image}", "ready": c.ready,
        "restartCount": c.restart_count, "started": c.started, "state": state,
        "lastState": {"terminated": c.last_terminated} if c.last_terminated else {},
    }
    if c.container_id:
        out["containerID"] = c.container_id
    return out


def pod_status(pod: Obj, state: PodState, previous: Obj, now: str) -> Obj:
    """The status to PATCH (strategic merge: conditions merge by type, so the scheduler's
    PodScheduled stays). Transition times carry over from ``previous`` when unchanged."""
    current = phase(pod, state)
    if previous.get("phase") in ("Succeeded", "Failed"):
        current = previous["phase"]  # the API server refuses to leave a terminal phase
    old = {c["type"]: c for c in previous.get("conditions") or []}
    ready, why, message = _readiness(state, current)
    initialized = state.init_done or current == "Succeeded"
    init_reason = "PodCompleted" if current == "Succeeded" else "" if initialized else "ContainersNotInitialized"
    pending = [c.name for c in state.init_containers
               if c.terminated is None or c.terminated.get("exitCode") != 0]
    init_message = "" if initialized else f"containers with incomplete status: [{' '.join(pending)}]"
    conditions = []
    for kind, ok, reason, text in (("Initialized", initialized, init_reason, init_message),
                                   ("Ready", ready, why, message), ("ContainersReady", ready, why, message)):
        since = now
        if kind in old and old[kind].get("status") == ("True" if ok else "False"):
            since = old[kind].get("lastTransitionTime") or now
        conditions.append(_condition(kind, ok, since, reason, text))
    status: Obj = {"phase": current, "conditions": conditions,
                   "containerStatuses": [container_status(c) for c in state.containers]}
    if state.init_containers:
        status["initContainerStatuses"] = [container_status(c) for c in state.init_containers]
    if state.pod_ip:
        status["podIP"] = state.pod_ip
        status["podIPs"] = [{"ip": state.pod_ip}]
    if state.host_ip:
        status["hostIP"] = state.host_ip
    if state.start_time:
        status["startTime"] = state.start_time
    return status
