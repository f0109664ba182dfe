"""The API's errors as ours: which class a status becomes, and the API server's own words kept."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from clustermesh.kube import KubeConflict, KubeError, KubeNotFound, _api_errors


def api_exception(status: int, reason: str, message: str | None = None) -> ApiException:
    exc = ApiException(status=status, reason=reason)
    exc.body = json.dumps({"kind": "Status", "message": message}) if message else "not json"
    return exc


def test_a_missing_object_is_not_found_with_the_servers_body() -> None:
    with (pytest.raises(KubeNotFound, match=r'reading Secret a/b: 404 Not Found: secrets "b" not found') as err,
          _api_errors("reading Secret a/b")):
        raise api_exception(404, "Not Found", 'secrets "b" not found')
    assert "not found" in err.value.body


def test_a_conflict_says_what_to_do_when_told() -> None:
    with (pytest.raises(KubeConflict, match=r"^changed meanwhile; run it again$"),
          _api_errors("updating ClusterMesh m", conflict="changed meanwhile; run it again")):
        raise api_exception(409, "Conflict", "the object has been modified")
    with (pytest.raises(KubeConflict, match="creating namespace n: 409 Conflict: already exists"),
          _api_errors("creating namespace n")):
        raise api_exception(409, "Conflict", "already exists")


def test_other_statuses_and_connection_errors_are_kube_errors() -> None:
    with pytest.raises(KubeError, match=r"^writing Lease x/y: 403 Forbidden$") as err, _api_errors("writing Lease x/y"):
        raise api_exception(403, "Forbidden")
    assert not isinstance(err.value, (KubeNotFound, KubeConflict))
    with pytest.raises(KubeError, match="refused; is the API server reachable"), _api_errors("GET /api"):
        raise ConnectionRefusedError("refused")
    with _api_errors("nothing wrong"):
        pass
