"""What a kubelet derives from a Pod object, as plain functions over plain dicts.

Environment (``env``, ``envFrom``, ``fieldRef``, key refs, ``$(VAR)`` expansion and the
service links), volume contents (ConfigMap, Secret, downwardAPI, projected), probes with
Kubernetes' defaults, restarts and the pod's /etc/hosts (the Pod status: pod_status.py), all as
Kubernetes 1.20's kubelet does them. No I/O: the node agent passes the ConfigMaps, Secrets
and Services it fetched.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

Obj = dict[str, Any]
# (kind, namespace, name) -> the object's data (Secrets already decoded), or None if absent
Lookup = Callable[[str, str, str], Mapping[str, bytes] | None]


class ConfigError(ValueError):
    """The pod refers to something missing: a kubelet reports CreateContainerConfigError."""


class ConfigMapData(dict[str, bytes]):
    """A ConfigMap's keys, ``data`` and ``binaryData`` together, remembering which came from
    ``binaryData``: volumes project both, but envFrom and configMapKeyRef read only ``data``."""

    binary: frozenset[str] = frozenset()


class ContainerEnv(dict[str, str]):
    """A container's whole environment (the image's ENV under the kubelet's variables).

    ``declared`` is the part a kubelet builds itself: the runtime merges the image's ENV in
    afterwards, so neither env values nor command and args can refer to it with $(VAR)."""

    def __init__(self, image: Mapping[str, str], declared: Mapping[str, str]) -> None:
        super().__init__({**image, **declared})
        self.declared = dict(declared)


# ------------------------------------------------------------------ environment

# IsEnvVarName: envFrom keys outside this are skipped rather than failing the container.
_ENV_VAR_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


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
    # Service and port names are DNS labels: '-' is the only character a variable name can't hold.
    return service.replace("-", "_").upper()


def _has_cluster_ip(svc: Obj) -> bool:
    ip = (svc.get("spec") or {}).get("clusterIP")
    return bool(ip) and ip != "None"


def _join_host_port(host: str, port: object) -> str:
    # As Go's net.JoinHostPort: an IPv6 address needs brackets to be told from its port.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _service_vars(svc: Obj) -> dict[str, str]:
    spec_ = svc.get("spec") or {}
    ip, ports = str(spec_.get("clusterIP")), spec_.get("ports") or []
    if not _has_cluster_ip(svc) or not ports:
        return {}
    name = _env_name(svc["metadata"]["name"])
    env = {f"{name}_SERVICE_HOST": ip, f"{name}_SERVICE_PORT": str(ports[0]["port"])}
    for p in ports:
        if p.get("name"):
            env[f"{name}_SERVICE_PORT_{_env_name(p['name'])}"] = str(p["port"])
    for i, p in enumerate(ports):
        proto = str(p.get("protocol") or "TCP")
        url = f"{proto.lower()}://{_join_host_port(ip, p['port'])}"
        if i == 0:  # Docker links single out the first port
            env[f"{name}_PORT"] = url
        prefix = f"{name}_PORT_{p['port']}_{proto.upper()}"
        env.update({prefix: url, f"{prefix}_PROTO": proto.lower(), f"{prefix}_PORT": str(p["port"]),
                    f"{prefix}_ADDR": ip})
    return env


def service_env(services: Iterable[Obj]) -> dict[str, str]:
    """The Docker-links-style variables a kubelet adds for each of the given Services."""
    env: dict[str, str] = {}
    for svc in sorted(services, key=lambda s: str(s["metadata"]["name"])):
        env.update(_service_vars(svc))
    return env


def _linked_services(namespace: str, links: bool, services: Iterable[Obj]) -> list[Obj]:
    """The Services a pod gets variables for: default/kubernetes always (the API server must be
    findable even with ``enableServiceLinks: false``), its own namespace's only with links on,
    and then a same-named Service of its own namespace wins over default/kubernetes."""
    chosen: dict[str, Obj] = {}
    for svc in services:
        if not _has_cluster_ip(svc):
            continue
        name, ns = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
        if ns == "default" and name == "kubernetes":
            chosen.setdefault(name, svc)
        elif ns == namespace and links:
            chosen[name] = svc
    return list(chosen.values())


def go_quote(text: str) -> str:
    """Go's ``%q`` of a string, which is how fieldpath.FormatMap writes label and annotation values."""
    return '"' + "".join(_go_char(c) for c in text) + '"'


_GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
               "\t": "\\t", "\v": "\\v"}


def _go_char(c: str) -> str:
    if c in _GO_ESCAPES:
        return _GO_ESCAPES[c]
    # Python's notion of printable (letters, marks, numbers, punctuation, symbols, ASCII space) is Go's.
    if c.isprintable():
        return c
    n = ord(c)
    if n < 0x20 or n == 0x7F:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _format_map(items: Mapping[str, Any]) -> str:
    return "\n".join(f"{k}={go_quote(str(v))}" for k, v in sorted(items.items()))


def _subscript(path: str) -> tuple[str, str] | None:
    """``metadata.labels['a[b]c']`` -> (``metadata.labels``, ``a[b]c``): the key runs to the final ``']``."""
    if not path.endswith("']"):
        return None
    head, sep, key = path[:-2].partition("['")
    return (head, key) if sep and head else None


def field_value(pod: Obj, path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    maps = {"metadata.labels": meta.get("labels") or {}, "metadata.annotations": meta.get("annotations") or {}}
    sub = _subscript(path)
    if sub is not None:
        if sub[0] not in maps:
            raise ConfigError(f"unsupported fieldRef {path!r}: only labels and annotations take a key")
        return str(maps[sub[0]].get(sub[1], ""))
    if path in maps:
        return _format_map(maps[path])
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
    raise ConfigError(f"unsupported fieldRef {path!r}")


# A resource.Quantity: a decimal number, then a binary (Ki..Ei), decimal (n..E) or exponent suffix.
_QUANTITY = re.compile(r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?")
_BINARY_SUFFIX = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL_SUFFIX = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# Limits a kubelet fills in from the node's allocatable when the container sets none (hugepages never).
_DEFAULTED_LIMITS = ("cpu", "memory", "ephemeral-storage")


def quantity(value: object) -> Fraction:
    """A Kubernetes quantity (``500m``, ``64Mi``, ``1e3``, ``2``), exactly."""
    m = _QUANTITY.fullmatch(str(value).strip())
    if m is None:
        raise ConfigError(f"invalid quantity {value!r}")
    number, suffix = Fraction(Decimal(m.group(1))), m.group(2) or ""
    if suffix in _BINARY_SUFFIX:
        return number * (1 << 10 * _BINARY_SUFFIX[suffix])
    exponent = _DECIMAL_SUFFIX[suffix] if suffix in _DECIMAL_SUFFIX else int(suffix[1:] or 0)
    return number * Fraction(10) ** exponent


def resource_value(container: Obj, ref: Obj, node_capacity: Mapping[str, str]) -> str:
    """A resourceFieldRef: the amount over the divisor (default 1), rounded up."""
    resource = str(ref.get("resource", ""))
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or not (name in _DEFAULTED_LIMITS or name.startswith("hugepages-")):
        raise ConfigError(f"unsupported container resource: {resource}")
    amount = quantity(((container.get("resources") or {}).get(kind) or {}).get(name, 0))
    if kind == "limits" and name in _DEFAULTED_LIMITS and amount == 0:
        amount = quantity(node_capacity.get(name, 0))
    divisor = quantity(ref.get("divisor") or 0) or Fraction(1)
    # A CPU amount counts in whole millicores and a memory or storage one in whole bytes, each
    # rounded up first, as a Quantity's MilliValue() and Value() are.
    scale = 1000 if name == "cpu" else 1
    numerator, denominator = math.ceil(amount * scale), math.ceil(divisor * scale)
    if denominator <= 0:
        raise ConfigError(f"invalid divisor {ref.get('divisor')!r} for {resource}")
    return str(math.ceil(Fraction(numerator, denominator)))


def _resource_container(pod: Obj, ref: Obj, default: Obj | None) -> Obj:
    """The container a resourceFieldRef reads: the one it names, else ``default``."""
    name = ref.get("containerName")
    spec_ = pod.get("spec", {})
    candidates: list[Obj] = [*(spec_.get("containers") or []), *(spec_.get("initContainers") or [])]
    for c in candidates:
        if name and c.get("name") == name:
            return c
    if name or default is None:
        raise ConfigError(f"resourceFieldRef names no container of the pod: {name!r}")
    return default


def _fetch(kind: str, ns: str, ref: Obj, lookup: Lookup) -> Mapping[str, bytes] | None:
    """The keys of a referenced ConfigMap or Secret that env may use; None when it is absent
    but optional."""
    name = ref.get("name", "")
    data = lookup(kind, ns, name)
    if data is None:
        if ref.get("optional"):
            return None
        raise ConfigError(f'{kind.lower()}s "{name}" not found')
    if isinstance(data, ConfigMapData) and data.binary:
        return {k: v for k, v in data.items() if k not in data.binary}
    return data


def _key_ref(kind: str, ns: str, ref: Obj, lookup: Lookup) -> str | None:
    data = _fetch(kind, ns, ref, lookup)
    key = ref.get("key", "")
    if data is None or (key not in data and ref.get("optional")):
        return None
    if key not in data:
        raise ConfigError(f"couldn't find key {key} in {kind} {ns}/{ref.get('name')}")
    return data[key].decode(errors="replace")


def _env_from(source: Obj, ns: str, lookup: Lookup) -> dict[str, str]:
    data: Mapping[str, bytes] | None = None
    if "configMapRef" in source:
        data = _fetch("ConfigMap", ns, source["configMapRef"], lookup)
    elif "secretRef" in source:
        data = _fetch("Secret", ns, source["secretRef"], lookup)
    prefix = source.get("prefix", "")
    # A key that is no variable name once prefixed is left out (a kubelet only records an event).
    return {prefix + k: v.decode(errors="replace") for k, v in (data or {}).items()
            if _ENV_VAR_NAME.fullmatch(prefix + k)}


def _env_value(var: Obj, pod: Obj, container: Obj, lookup: Lookup, env: Mapping[str, str],
               capacity: Mapping[str, str]) -> str | None:
    """One env entry's value; None leaves the variable as it was (an optional ref that is missing)."""
    src = var.get("valueFrom")
    if var.get("value") or not src:
        return expand(str(var.get("value") or ""), env)
    ns = pod["metadata"].get("namespace", "default")
    if "fieldRef" in src:
        return field_value(pod, src["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in src:
        ref = src["resourceFieldRef"]
        return resource_value(_resource_container(pod, ref, container), ref, capacity)
    if "configMapKeyRef" in src:
        return _key_ref("ConfigMap", ns, src["configMapKeyRef"], lookup)
    if "secretKeyRef" in src:
        return _key_ref("Secret", ns, src["secretKeyRef"], lookup)
    raise ConfigError(f"env {var['name']}: unsupported valueFrom {sorted(src)}")


def container_env(
    pod: Obj, container: Obj, lookup: Lookup, services: Iterable[Obj] = (),
    image_env: Mapping[str, str] | None = None, node_capacity: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment (a :class:`ContainerEnv`): the image's ENV, overridden by
    the service links, then envFrom, then env in order, each value expanded against the
    service links and the variables declared before it."""
    ns = pod["metadata"].get("namespace", "default")
    links = pod.get("spec", {}).get("enableServiceLinks") is not False  # the API server defaults it to true
    env = service_env(_linked_services(ns, links, services))
    for source in container.get("envFrom") or []:
        env.update(_env_from(source, ns, lookup))
    for var in container.get("env") or []:
        value = _env_value(var, pod, container, lookup, env, node_capacity or {})
        if value is not None:
            env[var["name"]] = value
    return ContainerEnv(image_env or {}, env)


def _expand_words(words: list[Any] | None, env: Mapping[str, str]) -> list[str] | None:
    # An empty list is as good as none: the image's entrypoint or cmd stays.
    return [expand(str(w), env) for w in words] if words else None


def command_line(container: Obj, env: Mapping[str, str]) -> tuple[list[str] | None, list[str] | None]:
    """``command`` and ``args`` with $(VAR) expanded (None where the pod leaves them to the image)."""
    source = env.declared if isinstance(env, ContainerEnv) else env
    return _expand_words(container.get("command"), source), _expand_words(container.get("args"), source)


# ------------------------------------------------------------------ volumes


def _object_files(kind: str, src: Obj, ns: str, lookup: Lookup) -> dict[str, bytes]:
    """A ConfigMap or Secret as files: every key, or the listed ``items`` (an optional
    source skips the listed keys it lacks)."""
    name = src.get("name") or src.get("secretName", "")
    optional = bool(src.get("optional"))
    data = lookup(kind, ns, name)
    if data is None:
        if optional:
            return {}
        raise ConfigError(f'{kind.lower()}s "{name}" not found')
    items = src.get("items")
    if not items:
        return dict(data)
    out = {}
    for item in items:
        if item["key"] in data:
            out[item["path"]] = data[item["key"]]
        elif not optional:
            raise ConfigError(f"{kind} {ns}/{name} references non-existent {kind.lower()} key: {item['key']}")
    return out


def _downward(pod: Obj, items: list[Obj], capacity: Mapping[str, str]) -> dict[str, bytes]:
    containers = pod["spec"].get("containers") or [{}]
    out = {}
    for item in items:
        if "fieldRef" in item:
            out[item["path"]] = field_value(pod, item["fieldRef"]["fieldPath"]).encode()
        elif "resourceFieldRef" in item:
            ref = item["resourceFieldRef"]
            out[item["path"]] = resource_value(_resource_container(pod, ref, containers[0]), ref, capacity).encode()
    return out


def _projection(src: Obj, pod: Obj, lookup: Lookup, token: Callable[[Obj], bytes] | None,
                capacity: Mapping[str, str]) -> dict[str, bytes]:
    ns = pod["metadata"].get("namespace", "default")
    if "configMap" in src:
        return _object_files("ConfigMap", src["configMap"], ns, lookup)
    if "secret" in src:
        return _object_files("Secret", src["secret"], ns, lookup)
    if "downwardAPI" in src:
        return _downward(pod, src["downwardAPI"].get("items", []), capacity)
    if "serviceAccountToken" in src:
        if token is None:
            raise ConfigError("serviceAccountToken projection needs the API server's TokenRequest")
        return {src["serviceAccountToken"].get("path", "token"): token(src["serviceAccountToken"])}
    return {}


def volume_files(
    volume: Obj, pod: Obj, lookup: Lookup, token: Callable[[Obj], bytes] | None = None,
    ca: bytes = b"", capacity: Mapping[str, str] | None = None,
) -> dict[str, bytes] | None:
    """The files of a ConfigMap, Secret, downwardAPI or projected volume (path -> content);
    None for the kinds that are folders (emptyDir) or host paths. ``token`` makes a
    service-account token for a projection's ``serviceAccountToken`` source."""
    if "configMap" in volume or "secret" in volume or "downwardAPI" in volume:
        return _projection(volume, pod, lookup, token, capacity or {})
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for src in volume["projected"].get("sources", []):
            files.update(_projection(src, pod, lookup, token, capacity or {}))
        return files
    return None


def decode_secret(secret: Obj) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def decode_configmap(cm: Obj) -> dict[str, bytes]:
    binary = cm.get("binaryData") or {}
    data = ConfigMapData({k: str(v).encode() for k, v in (cm.get("data") or {}).items()})
    data.update({k: base64.b64decode(v) for k, v in binary.items()})
    data.binary = frozenset(binary)
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
    """A probe's port: a number, or the name of one of the container's ports (a name is
    looked up first, then read as a number), which must lie in 1..65535."""
    number = _port_number(container, port)
    if not 0 < number < 65536:
        raise ConfigError(f"invalid port number: {number}")
    return number


def _port_number(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    if re.fullmatch(r"[+-]?[0-9]+", port):
        return int(port)
    raise ConfigError(f"container {container.get('name')} has no port named {port!r}")


# ------------------------------------------------------------------ restarts


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def backoff(restarts: int, base: float = 10.0, cap: float = 300.0) -> float:
    """A kubelet's crash-loop delay before restart number ``restarts + 1``: the first
    restart is immediate, then 10 s doubling up to 5 minutes."""
    if restarts <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (restarts - 1)))


# ------------------------------------------------------------------ /etc/hosts and resolv.conf


def pod_hostname(pod: Obj, domain: str = "cluster.local") -> tuple[str, str]:
    """(hostname, domain) as a kubelet gives them: ``spec.hostname`` or the pod's name, cut to
    the 63 characters a host name may have (and no trailing ``-`` or ``.``), and with a
    ``spec.subdomain`` the domain ``<subdomain>.<namespace>.svc.<cluster domain>``."""
    name = (pod["spec"].get("hostname") or pod["metadata"]["name"])[:63].rstrip("-.")
    subdomain = pod["spec"].get("subdomain")
    ns = pod["metadata"].get("namespace", "default")
    return name, f"{subdomain}.{ns}.svc.{domain}" if subdomain else ""


MCS_SERVICE_NAME = "multicluster.kubernetes.io/service-name"


def _service_hosts(namespace: str, services: Iterable[Obj], domain: str) -> list[str]:
    lines = []
    for svc in sorted(services, key=lambda s: (s["metadata"].get("namespace", ""), s["metadata"]["name"])):
        if not _has_cluster_ip(svc):
            continue
        name, ns = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
        names = [f"{name}.{ns}.svc.{domain}", f"{name}.{ns}.svc", f"{name}.{ns}"]
        if ns == namespace:
            names.append(name)
        imported = (svc["metadata"].get("labels") or {}).get(MCS_SERVICE_NAME)
        if imported and name.startswith("derived-"):
            # An MCS-API import: its derived Service's ClusterIP is the ServiceImport's ClusterSetIP
            # (KEP-1645's <service>.<namespace>.svc.clusterset.local, what CoreDNS's multicluster
            # plugin answers in a cluster).
            names.insert(0, f"{imported}.{ns}.svc.clusterset.local")
        lines.append(f"{svc['spec']['clusterIP']}\t{' '.join(names)}")
    return lines


def hosts_file(pod: Obj, pod_ip: str, services: Iterable[Obj], domain: str = "cluster.local") -> str:
    """The pod's /etc/hosts as a kubelet writes it (the pod under its host name and FQDN, then
    the hostAliases), and then the lab's addition: every Service with a ClusterIP under its
    DNS names (short names only for the pod's own namespace, as its resolv.conf search path
    would). The Services come last so that a hostAlias wins, as it wins over DNS in a cluster."""
    host, host_domain = pod_hostname(pod, domain)
    lines = ["# Kubernetes-managed hosts file.", "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             "fe00::0\tip6-localnet", "fe00::0\tip6-mcastprefix", "fe00::1\tip6-allnodes", "fe00::2\tip6-allrouters"]
    if pod_ip:
        lines.append(f"{pod_ip}\t{host}.{host_domain}\t{host}" if host_domain else f"{pod_ip}\t{host}")
    aliases = pod["spec"].get("hostAliases") or []
    if aliases:
        lines += ["", "# Entries added by HostAliases."]
        lines += ["\t".join([alias["ip"], *(alias.get("hostnames") or [])]) for alias in aliases]
    service_lines = _service_hosts(pod["metadata"].get("namespace", "default"), services, domain)
    if service_lines:
        lines += ["", "# Services: the lab has no cluster DNS server.", *service_lines]
    return "\n".join(lines) + "\n"


def resolv_conf(namespace: str, domain: str = "cluster.local") -> str:
    # No name server is reachable from a lab pod: every Service name is in /etc/hosts, and a
    # name that is not fails fast instead of waiting for a resolver that is not there.
    return (f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
            "nameserver 127.0.0.53\noptions ndots:5 timeout:1 attempts:1\n")


def references(pod: Obj) -> set[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret the pod's volumes and containers' env name."""
    refs: set[tuple[str, str]] = set()
    for vol in pod.get("spec", {}).get("volumes") or []:
        if "configMap" in vol:
            refs.add(("ConfigMap", vol["configMap"].get("name", "")))
        if "secret" in vol:
            refs.add(("Secret", vol["secret"].get("secretName", "")))
        for src in (vol.get("projected") or {}).get("sources", []):
            if "configMap" in src:
                refs.add(("ConfigMap", src["configMap"].get("name", "")))
            if "secret" in src:
                refs.add(("Secret", src["secret"].get("name", "")))
    for c in [*(pod.get("spec", {}).get("initContainers") or []), *(pod.get("spec", {}).get("containers") or [])]:
        for src in c.get("envFrom") or []:
            if "configMapRef" in src:
                refs.add(("ConfigMap", src["configMapRef"].get("name", "")))
            if "secretRef" in src:
                refs.add(("Secret", src["secretRef"].get("name", "")))
        for var in c.get("env") or []:
            vf = var.get("valueFrom") or {}
            if "configMapKeyRef" in vf:
                refs.add(("ConfigMap", vf["configMapKeyRef"].get("name", "")))
            if "secretKeyRef" in vf:
                refs.add(("Secret", vf["secretKeyRef"].get("name", "")))
    return refs
