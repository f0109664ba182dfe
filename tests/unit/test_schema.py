from __future__ import annotations

import json

import pytest

from clustermesh import schema
from clustermesh.schema import ClusterConfig, ClusterService, Node, NodeAddress, PortConfig, SchemaError

# The example record from DESIGN.md, as Cilium writes it.
CILIUM_EXAMPLE = (
    '{"cluster":"cluster3","namespace":"ns-alpha","name":"echo-service","frontends":'
    '{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.1.10":{"http":{"Protocol":"TCP",'
    '"Port":8080}}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":3}'
)


def test_decodes_cilium_record_and_reencodes_same_json() -> None:
    key = "cilium/state/services/v1/cluster3/ns-alpha/echo-service"
    svc = ClusterService.decode(CILIUM_EXAMPLE, key=key)
    assert svc.cluster_id == 3
    assert svc.frontends == {"10.96.0.10": {"http": PortConfig("TCP", 80)}}
    assert svc.backends == {"10.244.1.10": {"http": PortConfig("TCP", 8080)}}
    assert svc.key == key
    assert json.loads(svc.encode()) == json.loads(CILIUM_EXAMPLE)


def test_encoding_is_canonical() -> None:
    a = ClusterService("c1", "ns", "svc", 1, backends={"10.0.0.2": {"": PortConfig("TCP", 80)},
                                                       "10.0.0.1": {"": PortConfig("TCP", 80)}})
    b = ClusterService("c1", "ns", "svc", 1, backends={"10.0.0.1": {"": PortConfig("TCP", 80)},
                                                       "10.0.0.2": {"": PortConfig("TCP", 80)}})
    assert a.encode() == b.encode()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(cluster=""), "cluster name"),
        (lambda d: d.update(name=None), "service name"),
        (lambda d: d.update(clusterID=0), "outside 1..255"),
        (lambda d: d.update(clusterID=256), "outside 1..255"),
        (lambda d: d.update(clusterID="3"), "integer"),
        (lambda d: d["backends"].update({"not-an-ip": {}}), "not an IP"),
        (lambda d: d["backends"]["10.244.1.10"]["http"].update(Port=70000), "1..65535"),
        (lambda d: d["backends"]["10.244.1.10"]["http"].update(Protocol="ICMP"), "protocol"),
        (lambda d: d.update(labels={"a": 1}), "labels"),
        (lambda d: d.update(shared="false"), "shared must be true or false"),
        (lambda d: d.update(includeExternal=1), "includeExternal must be true or false"),
        (lambda d: d.update(zones={"10.244.1.10": "eu-1a"}), "must be an object"),
        (lambda d: d.update(zones={"not-an-ip": {"zone": "eu-1a"}}), "not an IP"),
        (lambda d: d.update(zones={"10.244.1.10": {"forZones": ["eu-1a"]}}), "forZones"),
    ],
)
def test_rejects_malformed_records(mutate, message: str) -> None:
    data = json.loads(CILIUM_EXAMPLE)
    mutate(data)
    with pytest.raises(SchemaError, match=message):
        ClusterService.decode(json.dumps(data))


def test_reads_and_writes_cilium_zones() -> None:
    data = json.loads(CILIUM_EXAMPLE)
    data["zones"] = {"10.244.1.10": {"zone": "eu-1a", "forZones": [{"name": "eu-1a"}, {"name": "eu-1b"}]}}
    svc = ClusterService.decode(json.dumps(data))
    assert svc.zones["10.244.1.10"]["zone"] == "eu-1a"
    assert json.loads(svc.encode()) == data


def test_shared_false_is_false() -> None:
    data = json.loads(CILIUM_EXAMPLE)
    data["shared"] = False
    assert ClusterService.decode(json.dumps(data)).shared is False


def test_node_reads_the_string_form_of_a_pod_cidr() -> None:
    data = Node("n", "c1", 1).to_json()
    data["IPv4AllocCIDR"] = "10.244.1.0/24"
    assert Node.decode(json.dumps(data)).ipv4_pod_cidr == "10.244.1.0/24"
    data["IPv4AllocCIDR"] = "10.244.1.7/24"  # not canonical: host bits set
    with pytest.raises(SchemaError, match="canonical"):
        Node.decode(json.dumps(data))


def test_rejects_key_that_names_another_service() -> None:
    with pytest.raises(SchemaError, match="does not match"):
        ClusterService.decode(CILIUM_EXAMPLE, key="cilium/state/services/v1/cluster4/ns-alpha/echo-service")


@pytest.mark.parametrize("raw", ["", "nope", "[]", "null", b"\xff\xfe"])
def test_rejects_non_objects(raw: str | bytes) -> None:
    with pytest.raises(SchemaError):
        ClusterService.decode(raw)


@pytest.mark.parametrize("name", ["a", "cluster-1", "a" * 32, "0abc9"])
def test_valid_cluster_names(name: str) -> None:
    assert schema.validate_cluster_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a_b", "a" * 33, "a.b", None, 3])
def test_invalid_cluster_names(name: object) -> None:
    with pytest.raises(SchemaError):
        schema.validate_cluster_name(name)


@pytest.mark.parametrize("cluster_id", [0, 256, -1, True, 1.5, "1"])
def test_invalid_cluster_ids(cluster_id: object) -> None:
    with pytest.raises(SchemaError):
        schema.validate_cluster_id(cluster_id)


def test_keys() -> None:
    assert schema.service_key("c", "ns", "n") == "cilium/state/services/v1/c/ns/n"
    assert schema.node_key("c", "node-1") == "cilium/state/nodes/v1/c/node-1"
    assert schema.cluster_config_key("c") == "cilium/cluster-config/c"
    assert schema.synced_key("c", schema.SERVICES_PREFIX) == "cilium/synced/c/cilium/state/services/v1"
    assert schema.parse_service_key("cilium/state/services/v1/c/ns/n") == schema.ServiceKey("c", "ns", "n")
    for bad in ("cilium/state/services/v1/c/ns", "other/c/ns/n", "cilium/state/services/v1/c//n"):
        with pytest.raises(SchemaError):
            schema.parse_service_key(bad)


def test_node_uses_go_field_names_and_round_trips() -> None:
    node = Node(
        "node-1", "c1", 1,
        addresses=(NodeAddress("InternalIP", "192.168.10.2"),),
        ipv4_pod_cidr="10.244.1.0/24",
    )
    data = node.to_json()
    assert data["IPv4AllocCIDR"] == {"IP": "10.244.1.0", "Mask": "////AA=="}
    assert data["IPAddresses"] == [{"Type": "InternalIP", "IP": "192.168.10.2"}]
    assert Node.decode(node.encode(), key="cilium/state/nodes/v1/c1/node-1") == node
    assert node.internal_ipv4() == "192.168.10.2"


def test_node_rejects_bad_cidr() -> None:
    data = Node("n", "c1", 1).to_json()
    data["IPv4AllocCIDR"] = {"IP": "10.0.0.0", "Mask": "!!"}
    with pytest.raises(SchemaError):
        Node.decode(json.dumps(data))


def test_cluster_config() -> None:
    cfg = ClusterConfig(3)
    assert json.loads(cfg.encode()) == {"id": 3, "capabilities": {"syncedCanaries": True, "maxConnectedClusters": 255}}
    assert ClusterConfig.decode(cfg.encode()) == cfg
    with pytest.raises(SchemaError):
        ClusterConfig.decode('{"id": 0}')


@pytest.mark.parametrize(("cluster_id", "max_id"), [(1, 255), (255, 255), (256, 511), (511, 511)])
def test_cluster_ids_up_to_the_mesh_maximum(cluster_id: int, max_id: int) -> None:
    assert schema.validate_cluster_id(cluster_id, max_id) == cluster_id


@pytest.mark.parametrize(("cluster_id", "max_id", "message"), [
    (256, 255, "outside 1..255"),
    (512, 511, "outside 1..511"),
    (0, 511, "outside 1..511"),
    (3, 300, "max connected clusters must be one of 255, 511"),
])
def test_cluster_ids_beyond_the_mesh_maximum(cluster_id: int, max_id: int, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        schema.validate_cluster_id(cluster_id, max_id)


def test_records_with_ids_above_255_decode_only_in_a_511_mesh() -> None:
    data = json.loads(CILIUM_EXAMPLE)
    data["clusterID"] = 300
    assert ClusterService.decode(json.dumps(data), max_cluster_id=511).cluster_id == 300
    with pytest.raises(SchemaError, match=r"outside 1\.\.255"):
        ClusterService.decode(json.dumps(data))
    node = Node("n", "c1", 300).to_json()
    assert Node.decode(json.dumps(node), max_cluster_id=511).cluster_id == 300
    with pytest.raises(SchemaError, match=r"outside 1\.\.255"):
        Node.decode(json.dumps(node))


def test_cluster_config_bounds_its_id_by_its_own_max_connected_clusters() -> None:
    cfg = ClusterConfig.decode('{"id": 300, "capabilities": {"syncedCanaries": true, "maxConnectedClusters": 511}}')
    assert (cfg.cluster_id, cfg.max_connected_clusters) == (300, 511)
    with pytest.raises(SchemaError, match=r"outside 1\.\.255"):
        ClusterConfig.decode('{"id": 300, "capabilities": {"maxConnectedClusters": 255}}')
    with pytest.raises(SchemaError, match="must be one of 255, 511"):
        ClusterConfig.decode('{"id": 3, "capabilities": {"maxConnectedClusters": 300}}')


def test_cluster_config_without_synced_canaries_as_cilium_operator_writes_it() -> None:
    # Go's omitempty: a false capability and a zero max-connected-clusters are absent.
    cfg = ClusterConfig.decode('{"id": 7}')
    assert cfg == ClusterConfig(7, synced_canaries=False, max_connected_clusters=255)
    assert ClusterConfig.decode('{"id": 7, "capabilities": {}}').synced_canaries is False
    assert json.loads(ClusterConfig(7, synced_canaries=False).encode()) == {
        "id": 7, "capabilities": {"maxConnectedClusters": 255}}


def test_has_cluster_config_key_is_ciliums() -> None:
    assert schema.HAS_CLUSTER_CONFIG_KEY == "cilium/.has-cluster-config"
