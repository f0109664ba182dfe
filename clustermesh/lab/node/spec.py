"""What a kubelet derives from a Pod object, as plain functions over plain dicts.

Environment (``env``, ``envFrom``, ``fieldRef``, key refs, ``$(VAR)`` expansion and the
service links), volume contents (ConfigMap, Secret, downwardAPI, projected), probes with
Kubernetes' defaults, and the Pod status a kubelet reports. No I/O: the node agent
passes the ConfigMaps, Secrets and Services it fetched.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]
# (kind, namespace, name) -> the object's data (Secrets already decoded), or None if absent
Lookup = Callable[[str, str, str], Mapping[str, bytes] | None]


class ConfigError(ValueError):
    """The pod refers to something missing: a kubelet reports CreateContainerConfigError."""


# ------------------------------------------------------------------ environment


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, unknown ones kept as
    written, and ``$$`` is a literal ``$`` (so ``$$(VAR)`` stays ``$(VAR)``)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env[name] if name in env else text[i:end + 1])
                    i = end + 1
                    continue
        out.append(c)
        i += 1
    return "".join(out)


def _env_name(service: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", service.upper())


def service_env(services: Iterable[Obj]) -> dict[str, str]:
    """The Docker-links-style variables a kubelet adds for each Service of the pod's namespace."""
    env: dict[str, str] = {}
    for svc in sorted(services, key=lambda s: str(s["metadata"]["name"])):
        ip = svc.get("spec", {}).get("clusterIP")
        ports = svc.get("spec", {}).get("ports") or []
        if not ip or ip == "None" or not ports:
            continue
        name = _env_name(svc["metadata"]["name"])
        first = ports[0]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(first["port"])
        for p in ports:
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{_env_name(p['name'])}"] = str(p["port"])
        proto = first.get("protocol", "TCP").lower()
        env[f"{name}_PORT"] = f"{proto}://{ip}:{first['port']}"
        for p in ports:
            pr = p.get("protocol", "TCP")
            prefix = f"{name}_PORT_{p['port']}_{pr}"
            env[prefix] = f"{pr.lower()}://{ip}:{p['port']}"
            env[f"{prefix}_PROTO"] = pr.lower()
            env[f"{prefix}_PORT"] = str(p["port"])
            env[f"{prefix}_ADDR"] = ip
    return env


def field_value(pod: Obj, path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(p["ip"] for p in status.get("podIPs") or []),
    }
    if path in simple:
        return str(simple[path] or "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError(f"unsupported fieldRef {path!r}")


def resource_value(container: Obj, ref: Obj, node_capacity: Mapping[str, str]) -> str:
    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    value = (container.get("resources", {}).get(kind) or {}).get(name)
    if value is None and kind == "limits":  # a kubelet reports the node's allocatable then
        value = node_capacity.get(name, "0")
    if value is None:
        value = "0"
    return str(value)


def _key_ref(kind: str, ns: str, ref: Obj, lookup: Lookup) -> str | None:
    data = lookup(kind, ns, ref.get("name", ""))
    optional = bool(ref.get("optional"))
    if data is None:
        if optional:
            return None
        raise ConfigError(f'{kind.lower()} "{ref.get("name")}" not found')
    if ref["key"] not in data:
        if optional:
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ns}/{ref.get('name')}")
    return data[ref["key"]].decode(errors="replace")


def container_env(
    pod: Obj, container: Obj, lookup: Lookup, services: Iterable[Obj] = (),
    image_env: Mapping[str, str] | None = None, node_capacity: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment, in a kubelet's order: image defaults, service links
    (unless ``enableServiceLinks: false``; the ``kubernetes`` Service always), envFrom,
    then env in order, each value expanded against what is defined before it."""
    ns = pod["metadata"].get("namespace", "default")
    env: dict[str, str] = dict(image_env or {})
    if pod.get("spec", {}).get("enableServiceLinks", True):
        env.update(service_env(services))
    else:
        env.update(service_env(s for s in services if s["metadata"]["name"] == "kubernetes"))
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key not in source:
                continue
            ref = source[key]
            data = lookup(kind, ns, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind.lower()} "{ref.get("name")}" not found')
            for k, v in data.items():
                env[prefix + k] = v.decode(errors="replace")
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var or "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        src = var["valueFrom"]
        value: str | None
        if "fieldRef" in src:
            value = field_value(pod, src["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in src:
            value = resource_value(container, src["resourceFieldRef"], node_capacity or {})
        elif "configMapKeyRef" in src:
            value = _key_ref("ConfigMap", ns, src["configMapKeyRef"], lookup)
        elif "secretKeyRef" in src:
            value = _key_ref("Secret", ns, src["secretKeyRef"], lookup)
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(src)}")
        if value is not None:
            env[name] = value
    return env


def command_line(container: Obj, env: Mapping[str, str]) -> tuple[list[str] | None, list[str] | None]:
    """``command`` and ``args`` with $(VAR) expanded (None where the pod leaves them to the image)."""
    command = container.get("command")
    args = container.get("args")
    return (
        [expand(str(c), env) for c in command] if command is not None else None,
        [expand(str(a), env) for a in args] if args is not None else None,
    )


# ------------------------------------------------------------------ volumes


def _items(data: Mapping[str, bytes], items: list[Obj] | None, what: str) -> dict[str, bytes]:
    if not items:
        return dict(data)
    out = {}
    for item in items:
        if item["key"] not in data:
            raise ConfigError(f"{what}: no key {item['key']!r}")
        out[item["path"]] = data[item["key"]]
    return out


def _downward(pod: Obj, items: list[Obj], containers: list[Obj], capacity: Mapping[str, str]) -> dict[str, bytes]:
    out = {}
    for item in items:
        if "fieldRef" in item:
            out[item["path"]] = field_value(pod, item["fieldRef"]["fieldPath"]).encode()
        elif "resourceFieldRef" in item:
            ref = item["resourceFieldRef"]
            c = next((c for c in containers if c["name"] == ref.get("containerName")), containers[0])
            out[item["path"]] = resource_value(c, ref, capacity).encode()
    return out


def volume_files(
    volume: Obj, pod: Obj, lookup: Lookup, token: Callable[[Obj], bytes] | None = None,
    ca: bytes = b"", capacity: Mapping[str, str] | None = None,
) -> dict[str, bytes] | None:
    """The files of a ConfigMap, Secret, downwardAPI or projected volume (path -> content);
    None for the kinds that are folders (emptyDir) or host paths. ``token`` makes a
    service-account token for a projection's ``serviceAccountToken`` source."""
    ns = pod["metadata"].get("namespace", "default")
    containers = pod["spec"].get("containers", [])

    def source_files(kind: str, src: Obj) -> dict[str, bytes]:
        name = src.get("name") or src.get("secretName", "")
        data = lookup(kind, ns, name)
        if data is None:
            if src.get("optional"):
                return {}
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        return _items(data, src.get("items"), f"{kind} {ns}/{name}")

    if "configMap" in volume:
        return source_files("ConfigMap", volume["configMap"])
    if "secret" in volume:
        return source_files("Secret", volume["secret"])
    if "downwardAPI" in volume:
        return _downward(pod, volume["downwardAPI"].get("items", []), containers, capacity or {})
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for src in volume["projected"].get("sources", []):
            if "configMap" in src:
                files.update(source_files("ConfigMap", src["configMap"]))
            elif "secret" in src:
                files.update(source_files("Secret", src["secret"]))
            elif "downwardAPI" in src:
                files.update(_downward(pod, src["downwardAPI"].get("items", []), containers, capacity or {}))
            elif "serviceAccountToken" in src:
                if token is None:
                    raise ConfigError("serviceAccountToken projection needs the API server's TokenRequest")
                files[src["serviceAccountToken"].get("path", "token")] = token(src["serviceAccountToken"])
        return files
    return None


def decode_secret(secret: Obj) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def decode_configmap(cm: Obj) -> dict[str, bytes]:
    data = {k: str(v).encode() for k, v in (cm.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
    return data


# ------------------------------------------------------------------ probes


@dataclass(frozen=True)
class Probe:
    kind: str  # httpGet | tcpSocket | exec
    action: Obj
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def probe(spec: Obj | None) -> Probe | None:
    if not spec:
        return None
    for kind in ("httpGet", "tcpSocket", "exec"):
        if kind in spec:
            return Probe(
                kind=kind, action=spec[kind],
                initial_delay=float(spec.get("initialDelaySeconds", 0)),
                period=float(spec.get("periodSeconds", 10) or 10),
                timeout=float(spec.get("timeoutSeconds", 1) or 1),
                success_threshold=int(spec.get("successThreshold", 1) or 1),
                failure_threshold=int(spec.get("failureThreshold", 3) or 3),
            )
    return None


def probe_port(container: Obj, port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ConfigError(f"container {container['name']} has no port named {port!r}")


# ------------------------------------------------------------------ status


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
    init_done: bool = True
    pod_ip: str = ""
    host_ip: str = ""
    start_time: str = ""


def phase(pod: Obj, state: PodState) -> str:
    """Running once any container runs (or is between restarts); Succeeded/Failed only for
    pods that are not restarted; Pending before that."""
    policy = pod.get("spec", {}).get("restartPolicy", "Always")
    cs = state.containers
    if any(c.running_since for c in cs):
        return "Running"
    if cs and policy != "Always" and all(c.terminated is not None for c in cs):
        if all(c.terminated and c.terminated.get("exitCode") == 0 for c in cs):
            return "Succeeded"
        if policy == "Never" or any(c.terminated and c.terminated.get("exitCode") != 0 for c in cs):
            return "Failed" if policy == "Never" else "Running"
    return "Running" if any(c.restart_count or c.last_terminated for c in cs) else "Pending"


def _condition(kind: str, ok: bool, since: str, reason: str = "") -> Obj:
    cond: Obj = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                 "lastTransitionTime": since}
    if not ok and reason:
        cond["reason"] = reason
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
    old = {c["type"]: c for c in previous.get("conditions") or []}
    cs = state.containers
    ready = bool(cs) and all(c.ready for c in cs)
    reason = "" if ready else "ContainersNotReady"
    conditions = []
    for kind, ok, why in (("Initialized", state.init_done, "ContainersNotInitialized"),
                          ("Ready", ready, reason), ("ContainersReady", ready, reason)):
        since = now
        if kind in old and old[kind].get("status") == ("True" if ok else "False"):
            since = old[kind].get("lastTransitionTime") or now
        conditions.append(_condition(kind, ok, since, why))
    status: Obj = {
        "phase": phase(pod, state), "conditions": conditions,
        "containerStatuses": [container_status(c) for c in cs],
    }
    if state.pod_ip:
        status["podIP"] = state.pod_ip
        status["podIPs"] = [{"ip": state.pod_ip}]
    if state.host_ip:
        status["hostIP"] = state.host_ip
    if state.start_time:
        status["startTime"] = state.start_time
    return status


# ------------------------------------------------------------------ restarts


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def backoff(restarts: int, base: float = 10.0, cap: float = 300.0) -> float:
    """A kubelet's crash-loop delay before restart number ``restarts + 1``: the first
    restart is immediate, then 10 s doubling up to 5 minutes."""
    if restarts <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (restarts - 1)))


def hosts_file(pod: Obj, pod_ip: str, services: Iterable[Obj], domain: str = "cluster.local") -> str:
    """The pod's /etc/hosts: itself, and every Service with a ClusterIP under its DNS names
    (short names only for the pod's own namespace, as its resolv.conf search path would)."""
    ns = pod["metadata"].get("namespace", "default")
    name = pod["spec"].get("hostname") or pod["metadata"]["name"]
    lines = ["# Kubernetes-managed hosts file (clustermesh lab node agent).",
             "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if pod_ip:
        lines.append(f"{pod_ip}\t{name}")
    for svc in sorted(services, key=lambda s: (s["metadata"].get("namespace", ""), s["metadata"]["name"])):
        ip = svc.get("spec", {}).get("clusterIP")
        if not ip or ip == "None":
            continue
        sname, sns = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
        names = [f"{sname}.{sns}.svc.{domain}", f"{sname}.{sns}.svc", f"{sname}.{sns}"]
        if sns == ns:
            names.append(sname)
        lines.append(f"{ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def resolv_conf(namespace: str, domain: str = "cluster.local") -> str:
    # No name server is reachable from a lab pod: every Service name is in /etc/hosts, and a
    # name that is not fails fast instead of waiting for a resolver that is not there.
    return (f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
            "nameserver 127.0.0.53\noptions ndots:5 timeout:1 attempts:1\n")
