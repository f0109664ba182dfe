"""What the lab's kubelet derives from a Pod, checked against Kubernetes 1.20's documented behaviour.

References (Kubernetes 1.20 sources): third_party/forked/golang/expansion/expand.go ($(VAR)),
pkg/kubelet/kubelet_pods.go (makeEnvironmentVariables, getPhase, managedHostsFileContent),
pkg/kubelet/envvars/envvars.go (service links), pkg/fieldpath/fieldpath.go (fieldRef),
pkg/api/v1/resource/helpers.go (resourceFieldRef), pkg/volume/{configmap,secret}/*.go (MakePayload),
pkg/apis/core/v1/defaults.go (probe defaults), pkg/kubelet/prober/prober.go (probe ports),
pkg/kubelet/status/{generate,status_manager}.go (conditions), pkg/kubelet/kubelet.go (backoff 10 s .. 300 s).
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from clustermesh.lab.node import pod_status, spec
from clustermesh.lab.node.pod_status import ContainerState, PodState
from clustermesh.lab.node.spec import ConfigError

Obj = dict[str, Any]
NOW = "2024-01-01T00:10:00Z"
EARLIER = "2024-01-01T00:00:00Z"


# ------------------------------------------------------------------ builders


def make_pod(name: str = "web", ns: str = "default", containers: list[Obj] | None = None, **spec_: Any) -> Obj:
    return {
        "metadata": {"name": name, "namespace": ns, "uid": "uid-1",
                     "labels": {"tier": "front", "app": "web"}, "annotations": {"note": "hello"}},
        "spec": {"nodeName": "node-1", "serviceAccountName": "sa-1",
                 "containers": containers or [{"name": "c"}], **spec_},
        "status": {"podIP": "10.1.0.5", "hostIP": "192.168.0.2",
                   "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]},
    }


def configmap(name: str, data: dict[str, str], binary: dict[str, bytes] | None = None) -> Obj:
    cm: Obj = {"kind": "ConfigMap", "metadata": {"name": name}, "data": data}
    if binary:
        cm["binaryData"] = {k: base64.b64encode(v).decode() for k, v in binary.items()}
    return cm


def secret(name: str, data: dict[str, bytes]) -> Obj:
    return {"kind": "Secret", "metadata": {"name": name},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def lookup_of(*objs: Obj, ns: str = "default") -> spec.Lookup:
    """A lookup over API objects, decoded the way the node agent decodes what it fetched."""
    store = {(o["kind"], ns, o["metadata"]["name"]): o for o in objs}

    def lookup(kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = store.get((kind, namespace, name))
        if obj is None:
            return None
        return spec.decode_configmap(obj) if kind == "ConfigMap" else spec.decode_secret(obj)

    return lookup


NOTHING = lookup_of()


def service(name: str, ip: str | None, ports: list[Obj], ns: str = "default") -> Obj:
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"clusterIP": ip, "ports": ports}}


def env_of(env: list[Obj], lookup: spec.Lookup = NOTHING, services: list[Obj] | None = None,
           env_from: list[Obj] | None = None, **kw: Any) -> dict[str, str]:
    container: Obj = {"name": "c", "env": env}
    if env_from is not None:
        container["envFrom"] = env_from
    pod = make_pod(containers=[container])
    return spec.container_env(pod, container, lookup, services or [], **kw)


# ------------------------------------------------------------------ $(VAR) expansion


@pytest.mark.parametrize(("text", "env", "want"), [
    ("$(A)", {"A": "x"}, "x"),
    ("pre-$(A)-post", {"A": "x"}, "pre-x-post"),
    ("$(A)$(B)", {"A": "1", "B": "2"}, "12"),
    ("$(UNKNOWN)", {}, "$(UNKNOWN)"),
    ("a $(UNKNOWN) $(A)", {"A": "x"}, "a $(UNKNOWN) x"),
    ("$$(A)", {"A": "x"}, "$(A)"),
    ("$$$(A)", {"A": "x"}, "$x"),
    ("$$(A)$(A)", {"A": "x"}, "$(A)x"),
    ("$$", {}, "$"),
    ("$$$$", {}, "$$"),
    ("cost: $$5", {}, "cost: $5"),
    ("$A", {"A": "x"}, "$A"),
    ("$", {}, "$"),
    ("a$", {}, "a$"),
    ("$(A", {"A": "x"}, "$(A"),
    ("$()", {}, "$()"),
    ("$($(A))", {"A": "x"}, "$($(A))"),
    ("$(A)", {"A": "$(B)", "B": "y"}, "$(B)"),  # values are not expanded again
    ("", {"A": "x"}, ""),
    ("no refs", {"A": "x"}, "no refs"),
])
def test_expand(text: str, env: dict[str, str], want: str) -> None:
    assert spec.expand(text, env) == want


# ------------------------------------------------------------------ env


def test_env_expands_against_earlier_vars_only() -> None:
    env = env_of([
        {"name": "A", "value": "1"},
        {"name": "B", "value": "$(A)-2"},
        {"name": "C", "value": "$(D)"},  # D is defined later: kept as written
        {"name": "D", "value": "4"},
        {"name": "E", "value": "$$(A)"},
    ])
    assert env == {"A": "1", "B": "1-2", "C": "$(D)", "D": "4", "E": "$(A)"}


def test_env_redefinition_sees_previous_value() -> None:
    assert env_of([{"name": "A", "value": "1"}, {"name": "A", "value": "$(A)2"}])["A"] == "12"


def test_env_value_from_is_usable_later_and_not_expanded_itself() -> None:
    lookup = lookup_of(configmap("cfg", {"raw": "$(NODE)"}))
    env = env_of([
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "WHERE", "value": "on-$(NODE)"},
        {"name": "RAW", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "raw"}}},
    ], lookup)
    assert env == {"NODE": "node-1", "WHERE": "on-node-1", "RAW": "$(NODE)"}


def test_env_from_then_env_overrides() -> None:
    lookup = lookup_of(configmap("one", {"A": "cm-a", "B": "cm-b"}), configmap("two", {"B": "two-b"}),
                       secret("sec", {"TOKEN": b"s3cret"}))
    env = env_of(
        [{"name": "A", "value": "env-a"}, {"name": "USE", "value": "$(B)/$(P_TOKEN)"}], lookup,
        env_from=[{"configMapRef": {"name": "one"}}, {"configMapRef": {"name": "two"}},
                  {"secretRef": {"name": "sec"}, "prefix": "P_"}],
    )
    assert env == {"A": "env-a", "B": "two-b", "P_TOKEN": "s3cret", "USE": "two-b/s3cret"}


def test_env_from_skips_keys_that_are_not_env_var_names() -> None:
    # Kubernetes: IsEnvVarName ([-._a-zA-Z][-._a-zA-Z0-9]*); others are skipped with an event.
    lookup = lookup_of(configmap("cfg", {"GOOD": "1", "1BAD": "2", "has space": "3", "my.dotted-name": "4"}))
    env = env_of([], lookup, env_from=[{"configMapRef": {"name": "cfg"}}])
    assert env == {"GOOD": "1", "my.dotted-name": "4"}


def test_env_from_configmap_uses_data_not_binary_data() -> None:
    # Kubernetes reads configMap.Data only for envFrom and configMapKeyRef.
    lookup = lookup_of(configmap("cfg", {"TEXT": "t"}, binary={"BLOB": b"\x00\x01"}))
    assert env_of([], lookup, env_from=[{"configMapRef": {"name": "cfg"}}]) == {"TEXT": "t"}
    with pytest.raises(ConfigError, match="BLOB"):
        env_of([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "BLOB"}}}], lookup)


def test_image_env_is_not_an_expansion_source() -> None:
    # Kubernetes expands against the container's declared vars and the service vars only; the image's
    # ENV is merged later by the runtime, so $(PATH) stays as written.
    container: Obj = {"name": "c", "env": [{"name": "X", "value": "$(PATH):/extra"}],
                      "command": ["echo", "$(PATH)"]}
    pod = make_pod(containers=[container])
    env = spec.container_env(pod, container, NOTHING, [], image_env={"PATH": "/usr/bin", "HOME": "/root"})
    assert env["X"] == "$(PATH):/extra"
    assert env["PATH"] == "/usr/bin"
    assert spec.command_line(container, env) == (["echo", "$(PATH)"], None)


def test_env_overrides_image_env() -> None:
    env = env_of([{"name": "HOME", "value": "/data"}], image_env={"HOME": "/root", "LANG": "C"})
    assert env == {"HOME": "/data", "LANG": "C"}


OPTIONAL_MISSING = [
    pytest.param({"configMapKeyRef": {"name": "absent", "key": "k", "optional": True}}, id="cm-absent"),
    pytest.param({"configMapKeyRef": {"name": "cfg", "key": "absent", "optional": True}}, id="cm-key-absent"),
    pytest.param({"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}, id="secret-absent"),
    pytest.param({"secretKeyRef": {"name": "sec", "key": "absent", "optional": True}}, id="secret-key-absent"),
]


@pytest.mark.parametrize("value_from", OPTIONAL_MISSING)
def test_optional_key_ref_missing_leaves_var_undefined(value_from: Obj) -> None:
    lookup = lookup_of(configmap("cfg", {"k": "v", "X": "from-cm"}), secret("sec", {"k": b"v"}))
    env = env_of([{"name": "X", "valueFrom": value_from}, {"name": "Y", "value": "$(X)"}], lookup)
    assert "X" not in env
    assert env["Y"] == "$(X)"


@pytest.mark.parametrize("value_from", OPTIONAL_MISSING)
def test_optional_key_ref_missing_keeps_earlier_definition(value_from: Obj) -> None:
    lookup = lookup_of(configmap("cfg", {"k": "v", "X": "from-cm"}), secret("sec", {"k": b"v"}))
    env = env_of([{"name": "X", "valueFrom": value_from}], lookup, env_from=[{"configMapRef": {"name": "cfg"}}])
    assert env["X"] == "from-cm"


@pytest.mark.parametrize("ref", ["configMapRef", "secretRef"])
def test_optional_env_from_missing_adds_nothing(ref: str) -> None:
    assert env_of([{"name": "A", "value": "1"}], env_from=[{ref: {"name": "absent", "optional": True}}]) == {"A": "1"}


@pytest.mark.parametrize(("container", "words"), [
    ({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg-gone", "key": "k"}}}]}, ["cfg-gone"]),
    ({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nokey", "optional": False}}}]},
     ["cfg", "nokey"]),
    ({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec-gone", "key": "k"}}}]}, ["sec-gone"]),
    ({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "nokey"}}}]}, ["sec", "nokey"]),
    ({"envFrom": [{"configMapRef": {"name": "cfg-gone"}}]}, ["cfg-gone"]),
    ({"envFrom": [{"secretRef": {"name": "sec-gone", "optional": False}}]}, ["sec-gone"]),
    ({"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}]}, ["spec.bogus"]),
])
def test_required_refs_missing_raise(container: Obj, words: list[str]) -> None:
    lookup = lookup_of(configmap("cfg", {"k": "v"}), secret("sec", {"k": b"v"}))
    container = {"name": "c", **container}
    with pytest.raises(ConfigError) as err:
        spec.container_env(make_pod(containers=[container]), container, lookup, [])
    for word in words:
        assert word in str(err.value)


def test_secret_key_ref_value() -> None:
    lookup = lookup_of(secret("sec", {"password": b"p@ss $(A)"}))
    assert env_of([{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}}],
                  lookup) == {"PW": "p@ss $(A)"}


# ------------------------------------------------------------------ fieldRef / resourceFieldRef


@pytest.mark.parametrize(("path", "want"), [
    ("metadata.name", "web"),
    ("metadata.namespace", "default"),
    ("metadata.uid", "uid-1"),
    ("spec.nodeName", "node-1"),
    ("spec.serviceAccountName", "sa-1"),
    ("status.podIP", "10.1.0.5"),
    ("status.hostIP", "192.168.0.2"),
    ("status.podIPs", "10.1.0.5,fd00::5"),
    ("metadata.labels['app']", "web"),
    ("metadata.labels['missing']", ""),
    ("metadata.annotations['note']", "hello"),
    ("metadata.labels", 'app="web"\ntier="front"'),
    ("metadata.annotations", 'note="hello"'),
])
def test_field_ref(path: str, want: str) -> None:
    assert spec.field_value(make_pod(), path) == want


@pytest.mark.parametrize("path", ["spec.nodeName", "spec.serviceAccountName", "status.podIP", "status.hostIP",
                                  "status.podIPs", "metadata.labels", "metadata.labels['app']"])
def test_field_ref_unset_is_empty(path: str) -> None:
    pod = {"metadata": {"name": "p", "namespace": "default"}, "spec": {"containers": [{"name": "c"}]}}
    assert spec.field_value(pod, path) == ""


def test_field_ref_label_map_is_go_quoted() -> None:
    # fieldpath.FormatMap writes each value with Go's %q, so quotes and newlines are escaped.
    pod = make_pod()
    pod["metadata"]["labels"] = {"b": 'say "hi"', "a": "x\ny"}
    assert spec.field_value(pod, "metadata.labels") == 'a="x\\ny"\nb="say \\"hi\\""'


@pytest.mark.parametrize("path", ["spec.bogus", "metadata.generateName", "status.phase"])
def test_field_ref_unsupported(path: str) -> None:
    with pytest.raises(ConfigError, match="unsupported"):
        spec.field_value(make_pod(), path)


@pytest.mark.parametrize(("resources", "ref", "want"), [
    ({"limits": {"cpu": "2"}}, {"resource": "limits.cpu"}, "2"),
    ({"limits": {"cpu": "500m"}}, {"resource": "limits.cpu"}, "1"),  # ceil(cores / divisor 1)
    ({"limits": {"cpu": "500m"}}, {"resource": "limits.cpu", "divisor": "1m"}, "500"),
    ({"limits": {"memory": "64Mi"}}, {"resource": "limits.memory"}, "67108864"),
    ({"requests": {"memory": "128Mi"}}, {"resource": "requests.memory", "divisor": "1Mi"}, "128"),
    ({}, {"resource": "limits.cpu"}, "4"),  # unset limit: the node's allocatable
    ({}, {"resource": "limits.memory", "divisor": "1Gi"}, "8"),
    ({}, {"resource": "requests.cpu"}, "0"),
])
def test_resource_field_ref(resources: Obj, ref: Obj, want: str) -> None:
    capacity = {"cpu": "4", "memory": "8Gi"}
    assert spec.resource_value({"name": "c", "resources": resources}, ref, capacity) == want


# ------------------------------------------------------------------ service links


def test_service_env_matches_envvars_from_services() -> None:
    svc = service("my-svc", "10.0.0.11", [{"name": "http", "port": 80, "protocol": "TCP"},
                                          {"name": "dns-udp", "port": 53, "protocol": "UDP"}])
    assert spec.service_env([svc]) == {
        "MY_SVC_SERVICE_HOST": "10.0.0.11",
        "MY_SVC_SERVICE_PORT": "80",
        "MY_SVC_SERVICE_PORT_HTTP": "80",
        "MY_SVC_SERVICE_PORT_DNS_UDP": "53",
        "MY_SVC_PORT": "tcp://10.0.0.11:80",
        "MY_SVC_PORT_80_TCP": "tcp://10.0.0.11:80",
        "MY_SVC_PORT_80_TCP_PROTO": "tcp",
        "MY_SVC_PORT_80_TCP_PORT": "80",
        "MY_SVC_PORT_80_TCP_ADDR": "10.0.0.11",
        "MY_SVC_PORT_53_UDP": "udp://10.0.0.11:53",
        "MY_SVC_PORT_53_UDP_PROTO": "udp",
        "MY_SVC_PORT_53_UDP_PORT": "53",
        "MY_SVC_PORT_53_UDP_ADDR": "10.0.0.11",
    }


def test_service_env_unnamed_port_defaults_to_tcp() -> None:
    env = spec.service_env([service("db", "10.0.0.12", [{"port": 5432}])])
    assert env == {"DB_SERVICE_HOST": "10.0.0.12", "DB_SERVICE_PORT": "5432", "DB_PORT": "tcp://10.0.0.12:5432",
                   "DB_PORT_5432_TCP": "tcp://10.0.0.12:5432", "DB_PORT_5432_TCP_PROTO": "tcp",
                   "DB_PORT_5432_TCP_PORT": "5432", "DB_PORT_5432_TCP_ADDR": "10.0.0.12"}


@pytest.mark.parametrize("ip", [None, "", "None"])
def test_service_env_skips_services_without_cluster_ip(ip: str | None) -> None:
    assert spec.service_env([service("headless", ip, [{"port": 80}])]) == {}


def test_service_env_first_port_protocol() -> None:
    env = spec.service_env([service("dns", "10.0.0.10", [{"name": "dns", "port": 53, "protocol": "UDP"},
                                                         {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])])
    assert env["DNS_PORT"] == "udp://10.0.0.10:53"
    assert env["DNS_PORT_53_UDP"] == "udp://10.0.0.10:53"
    assert env["DNS_PORT_53_TCP"] == "tcp://10.0.0.10:53"
    assert env["DNS_SERVICE_PORT_DNS_TCP"] == "53"


def test_service_env_ipv6_uses_join_host_port() -> None:
    env = spec.service_env([service("v6", "fd00::10", [{"port": 80}])])
    assert env["V6_PORT"] == "tcp://[fd00::10]:80"
    assert env["V6_PORT_80_TCP"] == "tcp://[fd00::10]:80"
    assert env["V6_PORT_80_TCP_ADDR"] == "fd00::10"


def test_service_links_in_container_env() -> None:
    services = [service("kubernetes", "10.0.0.1", [{"name": "https", "port": 443}]),
                service("backend", "10.0.0.20", [{"port": 8080}])]
    env = env_of([{"name": "URL", "value": "http://$(BACKEND_SERVICE_HOST):$(BACKEND_SERVICE_PORT)"},
                  {"name": "BACKEND_SERVICE_PORT", "value": "9999"}], services=services)
    assert env["URL"] == "http://10.0.0.20:8080"
    assert env["BACKEND_SERVICE_PORT"] == "9999"  # the pod's own var wins over the service link
    assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"
    assert env["KUBERNETES_SERVICE_PORT_HTTPS"] == "443"


def test_enable_service_links_false() -> None:
    container: Obj = {"name": "c"}
    pod = make_pod(containers=[container], enableServiceLinks=False)
    services = [service("kubernetes", "10.0.0.1", [{"port": 443}]), service("backend", "10.0.0.20", [{"port": 80}])]
    env = spec.container_env(pod, container, NOTHING, services)
    assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"
    assert not any(k.startswith("BACKEND_") for k in env)


def test_enable_service_links_false_keeps_only_the_master_service() -> None:
    # Only default/kubernetes is kept: a Service called "kubernetes" in the pod's own namespace is not.
    container: Obj = {"name": "c"}
    pod = make_pod(ns="team", containers=[container], enableServiceLinks=False)
    services = [service("kubernetes", "10.0.0.1", [{"port": 443}], ns="default"),
                service("backend", "10.0.0.20", [{"port": 8080}], ns="team"),
                service("kubernetes", "10.0.0.99", [{"port": 1}], ns="team")]
    env = spec.container_env(pod, container, NOTHING, services)
    assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "443"
    assert not any(k.startswith("BACKEND_") for k in env)


# ------------------------------------------------------------------ command and args


@pytest.mark.parametrize(("container", "want"), [
    ({}, (None, None)),
    ({"command": ["sh", "-c", "echo $(A) $$(A) $(NOPE)"]}, (["sh", "-c", "echo 1 $(A) $(NOPE)"], None)),
    ({"args": ["--port=$(PORT)"]}, (None, ["--port=8080"])),
    ({"command": ["run"], "args": ["$(A)$(PORT)"]}, (["run"], ["18080"])),
    ({"command": [], "args": []}, (None, None)),  # empty lists leave the image's entrypoint and cmd
])
def test_command_line(container: Obj, want: tuple[list[str] | None, list[str] | None]) -> None:
    assert spec.command_line({"name": "c", **container}, {"A": "1", "PORT": "8080"}) == want


# ------------------------------------------------------------------ volumes


CM = configmap("cfg", {"a.conf": "A", "b.conf": "B"}, binary={"blob.bin": b"\x00\xff"})
SEC = secret("sec", {"user": b"admin", "pass": b"pw"})
LOOKUP = lookup_of(CM, SEC)


@pytest.mark.parametrize(("volume", "want"), [
    ({"configMap": {"name": "cfg"}}, {"a.conf": b"A", "b.conf": b"B", "blob.bin": b"\x00\xff"}),
    ({"configMap": {"name": "cfg", "items": [{"key": "a.conf", "path": "conf/main.conf"}]}},
     {"conf/main.conf": b"A"}),
    ({"configMap": {"name": "cfg", "items": [{"key": "a.conf", "path": "x"}, {"key": "blob.bin", "path": "y"},
                                             {"key": "a.conf", "path": "z"}]}},
     {"x": b"A", "y": b"\x00\xff", "z": b"A"}),
    ({"configMap": {"name": "cfg", "defaultMode": 0o400}}, {"a.conf": b"A", "b.conf": b"B", "blob.bin": b"\x00\xff"}),
    ({"configMap": {"name": "absent", "optional": True}}, {}),
    ({"configMap": {"name": "cfg", "optional": True, "items": [{"key": "a.conf", "path": "a"},
                                                               {"key": "absent", "path": "b"}]}}, {"a": b"A"}),
    ({"secret": {"secretName": "sec"}}, {"user": b"admin", "pass": b"pw"}),
    ({"secret": {"secretName": "sec", "items": [{"key": "pass", "path": "password"}]}}, {"password": b"pw"}),
    ({"secret": {"secretName": "absent", "optional": True}}, {}),
    ({"secret": {"secretName": "sec", "optional": True, "items": [{"key": "absent", "path": "x"}]}}, {}),
    ({"emptyDir": {}}, None),
    ({"hostPath": {"path": "/tmp"}}, None),
])
def test_volume_files(volume: Obj, want: dict[str, bytes] | None) -> None:
    assert spec.volume_files({"name": "v", **volume}, make_pod(), LOOKUP) == want


@pytest.mark.parametrize(("volume", "words"), [
    ({"configMap": {"name": "cfg-gone"}}, ["cfg-gone"]),
    ({"configMap": {"name": "cfg", "items": [{"key": "nokey", "path": "x"}]}}, ["nokey"]),
    ({"secret": {"secretName": "sec-gone"}}, ["sec-gone"]),
    ({"secret": {"secretName": "sec", "items": [{"key": "nokey", "path": "x"}]}}, ["nokey"]),
    ({"projected": {"sources": [{"configMap": {"name": "cfg"}}, {"secret": {"name": "sec-gone"}}]}}, ["sec-gone"]),
])
def test_volume_required_missing_raises(volume: Obj, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        spec.volume_files({"name": "v", **volume}, make_pod(), LOOKUP)
    for word in words:
        assert word in str(err.value)


def test_downward_api_volume() -> None:
    pod = make_pod(containers=[{"name": "c", "resources": {"limits": {"cpu": "2"}}}])
    vol = {"name": "info", "downwardAPI": {"items": [
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
        {"path": "sub/note", "fieldRef": {"fieldPath": "metadata.annotations['note']"}},
        {"path": "cpu", "resourceFieldRef": {"containerName": "c", "resource": "limits.cpu"}},
    ]}}
    assert spec.volume_files(vol, pod, NOTHING, capacity={"cpu": "8"}) == {
        "labels": b'app="web"\ntier="front"', "name": b"web", "sub/note": b"hello", "cpu": b"2"}


def test_projected_volume_merges_sources() -> None:
    requested: list[Obj] = []

    def token(src: Obj) -> bytes:
        requested.append(src)
        return b"jwt"

    vol = {"name": "p", "projected": {"sources": [
        {"configMap": {"name": "cfg", "items": [{"key": "a.conf", "path": "a"}]}},
        {"secret": {"name": "sec", "items": [{"key": "user", "path": "u"}]}},
        {"secret": {"name": "absent", "optional": True}},
        {"downwardAPI": {"items": [{"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
    ]}}
    assert spec.volume_files(vol, make_pod(), LOOKUP, token=token) == {
        "a": b"A", "u": b"admin", "ns": b"default", "token": b"jwt"}
    assert requested == [{"path": "token", "expirationSeconds": 3600}]


def test_projected_token_without_token_maker() -> None:
    vol = {"name": "p", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}
    with pytest.raises(ConfigError, match="serviceAccountToken"):
        spec.volume_files(vol, make_pod(), LOOKUP)


def test_decode_secret_and_configmap() -> None:
    s = {"data": {"a": base64.b64encode(b"\x00bin").decode()}, "stringData": {"b": "text"}}
    assert spec.decode_secret(s) == {"a": b"\x00bin", "b": b"text"}
    assert spec.decode_secret({}) == {}
    cm = {"data": {"a": "x"}, "binaryData": {"b": base64.b64encode(b"\x01").decode()}}
    assert spec.decode_configmap(cm) == {"a": b"x", "b": b"\x01"}
    assert spec.decode_configmap({"data": None}) == {}


# ------------------------------------------------------------------ probes


@pytest.mark.parametrize(("probe", "want"), [
    (None, None),
    ({}, None),
    ({"initialDelaySeconds": 5}, None),  # no handler
    ({"httpGet": {"path": "/", "port": 80}}, spec.Probe("httpGet", {"path": "/", "port": 80}, 0, 10, 1, 1, 3)),
    ({"tcpSocket": {"port": "http"}}, spec.Probe("tcpSocket", {"port": "http"}, 0, 10, 1, 1, 3)),
    ({"exec": {"command": ["true"]}, "periodSeconds": 0, "timeoutSeconds": 0, "successThreshold": 0,
      "failureThreshold": 0}, spec.Probe("exec", {"command": ["true"]}, 0, 10, 1, 1, 3)),
    ({"exec": {"command": ["true"]}, "initialDelaySeconds": 7, "periodSeconds": 2, "timeoutSeconds": 5,
      "successThreshold": 2, "failureThreshold": 6}, spec.Probe("exec", {"command": ["true"]}, 7, 2, 5, 2, 6)),
])
def test_probe_defaults(probe: Obj | None, want: spec.Probe | None) -> None:
    assert spec.probe(probe) == want


PORTED = {"name": "c", "ports": [{"name": "http", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}]}


@pytest.mark.parametrize(("port", "want"), [(8080, 8080), (81, 81), ("8081", 8081), ("http", 8080), ("metrics", 9090)])
def test_probe_port(port: int | str, want: int) -> None:
    assert spec.probe_port(PORTED, port) == want


@pytest.mark.parametrize("port", ["grpc", "", 0, -1, 65536, "70000"])
def test_probe_port_invalid(port: int | str) -> None:
    # prober.extractPort: an unknown name, or a number outside 1..65535, is an error.
    with pytest.raises(ConfigError):
        spec.probe_port(PORTED, port)


def test_probe_port_error_names_the_port() -> None:
    with pytest.raises(ConfigError, match="grpc"):
        spec.probe_port(PORTED, "grpc")


# ------------------------------------------------------------------ phase


def running(name: str = "c") -> ContainerState:
    return ContainerState(name, "img", running_since=EARLIER, waiting=None, ready=True, started=True)


def waiting(name: str = "c") -> ContainerState:
    return ContainerState(name, "img")


def terminated(code: int, name: str = "c") -> ContainerState:
    return ContainerState(name, "img", waiting=None,
                          terminated={"exitCode": code, "reason": "Completed" if code == 0 else "Error"})


def crash_looping(code: int, name: str = "c") -> ContainerState:
    return ContainerState(name, "img", waiting=("CrashLoopBackOff", "back-off"), restart_count=2,
                          last_terminated={"exitCode": code, "reason": "Error"})


@pytest.mark.parametrize(("policy", "states", "want"), [
    ("Always", [], "Pending"),
    ("Always", [waiting()], "Pending"),
    ("Always", [running()], "Running"),
    ("Always", [running("a"), running("b")], "Running"),
    ("Always", [crash_looping(1)], "Running"),
    ("Always", [crash_looping(0)], "Running"),
    ("Always", [terminated(0)], "Running"),  # all exited, about to be restarted
    ("Always", [terminated(1)], "Running"),
    ("Always", [running("a"), waiting("b")], "Pending"),  # b never started
    ("Always", [running("a"), crash_looping(1, "b")], "Running"),
    ("OnFailure", [waiting()], "Pending"),
    ("OnFailure", [running()], "Running"),
    ("OnFailure", [terminated(0)], "Succeeded"),
    ("OnFailure", [terminated(1)], "Running"),
    ("OnFailure", [crash_looping(1)], "Running"),
    ("OnFailure", [terminated(0, "a"), terminated(1, "b")], "Running"),
    ("OnFailure", [terminated(0, "a"), running("b")], "Running"),
    ("Never", [waiting()], "Pending"),
    ("Never", [running()], "Running"),
    ("Never", [terminated(0)], "Succeeded"),
    ("Never", [terminated(0, "a"), terminated(0, "b")], "Succeeded"),
    ("Never", [terminated(1)], "Failed"),
    ("Never", [terminated(0, "a"), terminated(137, "b")], "Failed"),
    ("Never", [terminated(1, "a"), running("b")], "Running"),
    ("Never", [terminated(1, "a"), waiting("b")], "Pending"),
])
def test_phase(policy: str, states: list[ContainerState], want: str) -> None:
    pod = make_pod(restartPolicy=policy)
    assert pod_status.phase(pod, PodState(containers=states)) == want


def test_phase_defaults_to_restart_always() -> None:
    assert pod_status.phase(make_pod(), PodState(containers=[terminated(0)])) == "Running"


def test_phase_pending_while_initializing() -> None:
    assert pod_status.phase(make_pod(), PodState(containers=[waiting()], init_done=False)) == "Pending"


@pytest.mark.parametrize(("policy", "want"), [("Never", "Failed"), ("OnFailure", "Pending"), ("Always", "Pending")])
def test_a_failed_init_container_fails_the_pod_only_without_restarts(policy: str, want: str) -> None:
    state = PodState(containers=[waiting("main")], init_containers=[terminated(1, "init")], init_done=False)
    assert pod_status.phase(make_pod(restartPolicy=policy), state) == want


def test_pod_status_reports_init_containers() -> None:
    state = PodState(containers=[waiting("main")], init_containers=[terminated(0, "a"), running("b")],
                     init_done=False)
    status = pod_status.pod_status(make_pod(), state, {}, NOW)
    init = conditions(status)["Initialized"]
    assert (init["status"], init["reason"]) == ("False", "ContainersNotInitialized")
    assert init["message"] == "containers with incomplete status: [b]"
    assert [(c["name"], list(c["state"])) for c in status["initContainerStatuses"]] == [
        ("a", ["terminated"]), ("b", ["running"])]
    assert "initContainerStatuses" not in pod_status.pod_status(make_pod(), PodState(containers=[running()]), {}, NOW)


# ------------------------------------------------------------------ pod status


def conditions(status: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in status["conditions"]}


def test_pod_status_not_ready() -> None:
    state = PodState(containers=[running("a"), waiting("b")], pod_ip="10.1.0.5", host_ip="192.168.0.2",
                     start_time=EARLIER)
    status = pod_status.pod_status(make_pod(), state, {}, NOW)
    conds = conditions(status)
    assert set(conds) == {"Initialized", "Ready", "ContainersReady"}  # PodScheduled is the scheduler's
    assert conds["Initialized"]["status"] == "True"
    for kind in ("Ready", "ContainersReady"):
        assert conds[kind]["status"] == "False"
        assert conds[kind]["reason"] == "ContainersNotReady"
        assert conds[kind]["lastTransitionTime"] == NOW
    assert status["podIP"] == "10.1.0.5"
    assert status["podIPs"] == [{"ip": "10.1.0.5"}]
    assert status["hostIP"] == "192.168.0.2"
    assert status["startTime"] == EARLIER
    assert [c["name"] for c in status["containerStatuses"]] == ["a", "b"]


def test_pod_status_not_ready_message_names_containers() -> None:
    status = pod_status.pod_status(make_pod(), PodState(containers=[waiting("a"), running("b"), waiting("c")]), {}, NOW)
    for kind in ("Ready", "ContainersReady"):
        assert conditions(status)[kind]["message"] == "containers with unready status: [a c]"


def test_pod_status_ready() -> None:
    status = pod_status.pod_status(make_pod(), PodState(containers=[running("a"), running("b")]), {}, NOW)
    for cond in status["conditions"]:
        assert cond["status"] == "True"
        assert "reason" not in cond
    assert "podIP" not in status


def test_pod_status_no_containers_is_not_ready() -> None:
    status = pod_status.pod_status(make_pod(), PodState(), {}, NOW)
    assert conditions(status)["Ready"]["status"] == "False"


def test_pod_status_initializing() -> None:
    status = pod_status.pod_status(make_pod(), PodState(containers=[waiting()], init_done=False), {}, NOW)
    assert conditions(status)["Initialized"]["status"] == "False"
    assert conditions(status)["Initialized"]["reason"] == "ContainersNotInitialized"


def test_pod_status_succeeded_reason_is_pod_completed() -> None:
    pod = make_pod(restartPolicy="Never")
    status = pod_status.pod_status(pod, PodState(containers=[terminated(0)]), {}, NOW)
    assert status["phase"] == "Succeeded"
    for kind in ("Ready", "ContainersReady"):
        assert conditions(status)[kind]["status"] == "False"
        assert conditions(status)[kind]["reason"] == "PodCompleted"


@pytest.mark.parametrize(("old_status", "ready", "want_time"), [
    ("True", True, EARLIER),   # unchanged: keeps the old transition time
    ("False", False, EARLIER),
    ("True", False, NOW),      # changed: now
    ("False", True, NOW),
    (None, True, NOW),         # no previous condition
])
def test_pod_status_transition_times(old_status: str | None, ready: bool, want_time: str) -> None:
    previous: Obj = {"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": EARLIER}]}
    if old_status is not None:
        previous["conditions"] += [{"type": kind, "status": old_status, "lastTransitionTime": EARLIER}
                                   for kind in ("Ready", "ContainersReady")]
    state = PodState(containers=[running() if ready else waiting()])
    conds = conditions(pod_status.pod_status(make_pod(), state, previous, NOW))
    assert conds["Ready"]["lastTransitionTime"] == want_time
    assert conds["ContainersReady"]["lastTransitionTime"] == want_time


def test_pod_status_transition_time_per_condition() -> None:
    previous = {"conditions": [{"type": "Initialized", "status": "True", "lastTransitionTime": EARLIER},
                               {"type": "Ready", "status": "False", "lastTransitionTime": EARLIER}]}
    conds = conditions(pod_status.pod_status(make_pod(), PodState(containers=[running()]), previous, NOW))
    assert conds["Initialized"]["lastTransitionTime"] == EARLIER
    assert conds["Ready"]["lastTransitionTime"] == NOW


@pytest.mark.parametrize(("state", "want_state", "want_last"), [
    (running(), {"running": {"startedAt": EARLIER}}, {}),
    (waiting(), {"waiting": {"reason": "ContainerCreating"}}, {}),
    (crash_looping(1), {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
     {"terminated": {"exitCode": 1, "reason": "Error"}}),
    (terminated(0), {"terminated": {"exitCode": 0, "reason": "Completed"}}, {}),
])
def test_container_status(state: ContainerState, want_state: Obj, want_last: Obj) -> None:
    out = pod_status.container_status(state)
    assert out["state"] == want_state
    assert out["lastState"] == want_last
    assert out["name"] == state.name
    assert out["restartCount"] == state.restart_count
    assert out["ready"] is state.ready
    assert "containerID" not in out


def test_container_status_id() -> None:
    state = running()
    state.container_id = "lab://abc"
    assert pod_status.container_status(state)["containerID"] == "lab://abc"


# ------------------------------------------------------------------ restarts


@pytest.mark.parametrize(("policy", "code", "want"), [
    ("Always", 0, True), ("Always", 1, True),
    ("OnFailure", 0, False), ("OnFailure", 1, True), ("OnFailure", 137, True),
    ("Never", 0, False), ("Never", 1, False),
])
def test_should_restart(policy: str, code: int, want: bool) -> None:
    assert spec.should_restart(policy, code) is want


def test_backoff_sequence() -> None:
    assert [spec.backoff(n) for n in range(10)] == [0, 10, 20, 40, 80, 160, 300, 300, 300, 300]


def test_backoff_never_negative_or_above_cap() -> None:
    assert spec.backoff(-1) == 0
    assert spec.backoff(1000) == 300


# ------------------------------------------------------------------ /etc/hosts and resolv.conf


def test_hosts_file_base() -> None:
    lines = spec.hosts_file(make_pod(), "10.1.0.5", []).splitlines()
    assert lines[0].startswith("# Kubernetes-managed hosts file")
    assert lines[1:3] == ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    assert "10.1.0.5\tweb" in lines


def test_hosts_file_ipv6_names() -> None:
    lines = spec.hosts_file(make_pod(), "10.1.0.5", []).splitlines()
    assert lines[1:7] == ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                          "fe00::0\tip6-localnet", "fe00::0\tip6-mcastprefix",
                          "fe00::1\tip6-allnodes", "fe00::2\tip6-allrouters"]


def test_hosts_file_without_ip_has_no_pod_line() -> None:
    assert "\tweb" not in spec.hosts_file(make_pod(), "", [])


def test_hosts_file_hostname_wins_over_pod_name() -> None:
    text = spec.hosts_file(make_pod(hostname="box"), "10.1.0.5", [])
    assert "10.1.0.5\tbox\n" in text
    assert "\tweb" not in text


def test_hosts_file_subdomain() -> None:
    text = spec.hosts_file(make_pod(ns="team", hostname="box", subdomain="grp"), "10.1.0.5", [])
    assert "10.1.0.5\tbox.grp.team.svc.cluster.local\tbox\n" in text


def test_hosts_file_truncates_long_hostname() -> None:
    name = "a" * 62 + "-" + "b" * 10
    text = spec.hosts_file(make_pod(name=name), "10.1.0.5", [])
    assert "10.1.0.5\t" + "a" * 62 + "\n" in text


def test_hosts_file_host_aliases() -> None:
    pod = make_pod(hostAliases=[{"ip": "127.0.0.1", "hostnames": ["foo.local", "bar.local"]},
                                {"ip": "10.9.9.9", "hostnames": ["remote"]}])
    text = spec.hosts_file(pod, "10.1.0.5", [])
    assert "# Entries added by HostAliases.\n127.0.0.1\tfoo.local\tbar.local\n10.9.9.9\tremote\n" in text


def test_hosts_file_services() -> None:
    # The lab's addition (no DNS server): every ClusterIP Service under its names, short name only at home.
    services = [service("api", "10.0.0.30", [{"port": 80}], ns="team"),
                service("db", "10.0.0.31", [{"port": 5432}], ns="other"),
                service("headless", "None", [{"port": 80}], ns="team")]
    lines = spec.hosts_file(make_pod(ns="team"), "10.1.0.5", services).splitlines()
    assert "10.0.0.30\tapi.team.svc.cluster.local api.team.svc api.team api" in lines
    assert "10.0.0.31\tdb.other.svc.cluster.local db.other.svc db.other" in lines
    assert not any("headless" in line for line in lines)


def test_hosts_file_clusterset_names() -> None:
    # An MCS-API import: the derived Service's IP under <service>.<namespace>.svc.clusterset.local.
    derived = service("derived-9jo8ljlgl7", "10.0.0.40", [{"port": 80}], ns="other")
    derived["metadata"]["labels"] = {"multicluster.kubernetes.io/service-name": "full"}
    plain = service("web", "10.0.0.41", [{"port": 80}], ns="other")
    plain["metadata"]["labels"] = {"multicluster.kubernetes.io/service-name": "web"}  # not derived: no name
    text = spec.hosts_file(make_pod(ns="team"), "10.1.0.5", [derived, plain])
    assert "10.0.0.40\tfull.other.svc.clusterset.local derived-9jo8ljlgl7.other.svc.cluster.local" in text
    assert "web.other.svc.clusterset.local" not in text


def test_resolv_conf() -> None:
    lines = spec.resolv_conf("team", "example.org").splitlines()
    assert "search team.svc.example.org svc.example.org example.org" in lines
    options = next(line for line in lines if line.startswith("options "))
    assert "ndots:5" in options.split()
    assert any(line.startswith("nameserver ") for line in lines)


def test_references_name_every_configmap_and_secret_of_volumes_and_env() -> None:
    pod = {"spec": {
        "volumes": [{"name": "a", "configMap": {"name": "cm-vol"}}, {"name": "b", "secret": {"secretName": "s-vol"}},
                    {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}},
                                                            {"secret": {"name": "s-proj"}}]}},
                    {"name": "d", "emptyDir": {}}],
        "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "s-init"}}]}],
        "containers": [{"name": "m", "envFrom": [{"configMapRef": {"name": "cm-from"}}],
                        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm-key", "key": "k"}}},
                                {"name": "Y", "valueFrom": {"secretKeyRef": {"name": "s-key", "key": "k"}}},
                                {"name": "Z", "value": "plain"}]}],
    }}
    assert spec.references(pod) == {
        ("ConfigMap", "cm-vol"), ("Secret", "s-vol"), ("ConfigMap", "cm-proj"), ("Secret", "s-proj"),
        ("Secret", "s-init"), ("ConfigMap", "cm-from"), ("ConfigMap", "cm-key"), ("Secret", "s-key"),
    }
