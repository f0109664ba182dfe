"""What the lab's kubelet keeps: its node's settings, and per pod the record that survives a restart
of the node agent (container pids with their start times, restarts, the pod's address)."""

from __future__ import annotations

import datetime as dt
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Obj = dict[str, Any]


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class NodeConfig:
    name: str
    kubeconfig: str
    netns: str  # the node's network namespace
    address: str  # InternalIP on the underlay
    pod_cidr: str
    cgroup: Path  # the node's cgroup; pods get children
    state_dir: Path
    port: int  # this agent's HTTPS port on 127.0.0.1
    tls_cert: Path
    tls_key: Path
    client_ca: Path
    api_port: int  # the API server's port on the host's 127.0.0.1, forwarded inside the node
    pod_prefix: str  # pod namespace names start with this (the lab removes them by prefix)
    context: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    drain_delay: float = 1.0  # seconds between "not ready" and the stop signal, see terminate()
    max_pods: int = 110


@dataclass
class ContainerRecord:
    """What survives a node agent restart for one container."""

    pid: int = 0
    start: str = ""  # /proc start time of pid, so a reused pid is not mistaken for ours
    restarts: int = 0
    started_at: str = ""
    last_terminated: Obj | None = None
    stop_signal: int = signal.SIGTERM
    finished: Obj | None = None  # its final terminated state, once restartPolicy says it stays down


@dataclass
class PodRecord:
    uid: str
    namespace: str
    name: str
    netns: str
    veth: str
    ip: str
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    start_time: str = ""

    @classmethod
    def load(cls, path: Path) -> PodRecord:
        data = json.loads(path.read_text())
        data["containers"] = {k: ContainerRecord(**v) for k, v in data.get("containers", {}).items()}
        return cls(**data)
