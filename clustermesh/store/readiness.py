"""When a remote's records may be used: its cluster-config agrees with the ClusterMesh and, when it
announces synced canaries, its services and nodes are marked synced. ``not_ready_reason`` answers with a
``NotReady`` (a message for people, an ``Unready`` kind for code). Pure."""

from __future__ import annotations

import enum
from collections.abc import Collection

from clustermesh import schema
from clustermesh.schema import ClusterConfig, SchemaError

# What a reader must have seen of a remote before trusting it: the synced marker of each prefix.
REQUIRED_SYNCED = {schema.SERVICES_PREFIX: "services", schema.NODES_PREFIX: "nodes"}


class Unready(enum.Enum):
    """Why a remote is not used yet: what callers branch on (the message is for people)."""

    NO_CONFIG = "no cluster-config"
    BAD_CONFIG = "cluster-config does not parse"
    ID_MISMATCH = "the remote's ID is not the ClusterMesh's"
    WAITING = "waiting for synced markers"
    SWITCHING = "switching layout"
    LISTING = "first listing"

    @property
    def misconfigured(self) -> bool:
        """A user has to fix something (not a matter of waiting)."""
        return self in (Unready.BAD_CONFIG, Unready.ID_MISMATCH)


class NotReady(str):
    """A not-ready reason: the message (a ``str``, as logs and status show it) and its ``kind``."""

    kind: Unready

    def __new__(cls, kind: Unready, message: str) -> NotReady:
        reason = super().__new__(cls, message)
        reason.kind = kind
        return reason


def not_ready_reason(
    name: str,
    expected_id: int,
    config_value: str | None,
    synced: Collection[str],
    max_cluster_id: int = schema.MAX_CLUSTER_ID,
) -> NotReady | None:
    """Why a remote is not to be trusted yet, or None when it is ready. Pure.

    ``config_value`` is the raw ``cilium/cluster-config/<name>`` (None when absent);
    ``synced`` the prefixes whose synced marker the remote wrote (``cilium/state/services/v1``...).
    A remote whose cluster-config does not announce the ``syncedCanaries`` capability
    never writes markers (cilium-operator in kvstore mode): like Cilium, trust it at once."""
    if config_value is None:
        return NotReady(Unready.NO_CONFIG, "no cluster-config")
    try:
        config = ClusterConfig.decode(config_value)
        schema.validate_cluster_id(config.cluster_id, max_cluster_id)
    except SchemaError as exc:
        return NotReady(Unready.BAD_CONFIG, f"cluster-config does not parse: {exc}")
    if config.cluster_id != expected_id:
        return NotReady(Unready.ID_MISMATCH,
                        f"says its ID is {config.cluster_id}, the ClusterMesh says {expected_id}")
    if not config.synced_canaries:
        return None
    # A KVStoreMesh cache marks its copies synced under the cache prefixes (Cilium's layout).
    missing = [what for prefix, what in REQUIRED_SYNCED.items()
               if (schema.state_to_cache(prefix) if config.cached else prefix) not in synced]
    if missing:
        return NotReady(Unready.WAITING, f"waiting for synced markers of {' and '.join(missing)}")
    return None
