"""The lab's image catalog: names, Kubernetes' command/args rules, nginx's config, the Star Wars manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from clustermesh.lab.node import catalog
from clustermesh.lab.node.catalog import CommandNotFound, Image, ImageNotInCatalog, kubernetes_argv, resolve
from clustermesh.lab.node.images import json_mock
from tests.prereq import require_binary, require_root

REPO = Path(__file__).resolve().parents[2]
STARWARS = REPO / "demo" / "starwars"


@pytest.mark.parametrize(("image", "name"), [
    ("nginx", "nginx"),
    ("nginx:1.15.8", "nginx"),
    ("docker.io/nginx:1.15.8", "nginx"),
    ("docker.io/library/nginx:1.15.8", "nginx"),
    ("index.docker.io/library/nginx", "nginx"),
    ("library/nginx:latest", "nginx"),
    ("nginx@sha256:" + "a" * 64, "nginx"),
    ("nginx:1.25@sha256:" + "b" * 64, "nginx"),
    ("docker.io/cilium/json-mock:1.2", "cilium/json-mock"),
    ("Docker.io/Cilium/JSON-Mock:1.2", "cilium/json-mock"),
    ("localhost:5000/clustermesh", "localhost:5000/clustermesh"),
    ("localhost:5000/clustermesh:dev", "localhost:5000/clustermesh"),
    ("quay.io/coreos/etcd:v3.5.0", "quay.io/coreos/etcd"),
])
def test_normalise(image: str, name: str) -> None:
    assert catalog.normalise(image) == name


@pytest.mark.parametrize(("image", "key"), [
    ("docker.io/nginx:1.15.8", "nginx"),
    ("nginxinc/nginx-unprivileged:stable", "nginxinc/nginx-unprivileged"),
    ("docker.io/cilium/json-mock:1.2", "cilium/json-mock"),
    ("quay.io/cilium/json-mock:v1.3.8", "cilium/json-mock"),
    ("curlimages/curl:8.5.0", "curlimages/curl"),
    ("busybox:1.36", "busybox"),
    ("alpine:3.19", "alpine"),
    ("nicolaka/netshoot", "nicolaka/netshoot"),
    ("debian:bookworm", "debian"),
    ("ubuntu:22.04", "ubuntu"),
    ("clustermesh:dev", "clustermesh"),
    ("ghcr.io/someone/clustermesh:v0.1.0", "clustermesh"),
    ("localhost:5000/clustermesh", "clustermesh"),
    ("quay.io/coreos/etcd:v3.5.0", "quay.io/coreos/etcd"),
    ("gcr.io/etcd-development/etcd:v3.5.9", "quay.io/coreos/etcd"),
    ("registry.k8s.io/etcd:3.5.9-0", "quay.io/coreos/etcd"),
    ("k8s.gcr.io/pause:3.2", "registry.k8s.io/pause"),
])
def test_lookup(image: str, key: str) -> None:
    assert catalog.lookup(image) is catalog.CATALOG[key]


@pytest.mark.parametrize("image", ["foo/bar:1", "quay.io/nginx", "clustermesh-operator:dev", "etcd", "redis"])
def test_unknown_image_names_the_catalog(image: str, tmp_path: Path) -> None:
    with pytest.raises(ImageNotInCatalog) as err:
        resolve(image, None, None, tmp_path)
    message = str(err.value)
    assert message.startswith(f'image "{image}" is not in the lab\'s catalog (')
    for known in ("nginx", "cilium/json-mock", "curlimages/curl", "busybox", "clustermesh"):
        assert known in message
    assert message.endswith('see README "Lab images"')


def test_catalog_table_lists_every_entry() -> None:
    table = catalog.catalog_table()
    assert len(table) == len(catalog.CATALOG)
    images = " ".join(image for image, _ in table)
    for name in ("`nginx`", "`cilium/json-mock`", "`quay.io/cilium/json-mock`", "`gcr.io/etcd-development/etcd`",
                 "`clustermesh` (any registry)"):
        assert name in images
    assert all(runs for _, runs in table)


PLAIN = Image(runs="test", entrypoint=("/ep",), cmd=("c1", "c2"))
NO_ENTRYPOINT = Image(runs="test", cmd=("sh",))


@pytest.mark.parametrize(("entry", "command", "args", "argv"), [
    (PLAIN, None, None, ["/ep", "c1", "c2"]),           # image ENTRYPOINT + CMD
    (PLAIN, [], [], ["/ep", "c1", "c2"]),               # empty lists mean unset, as in the kubelet
    (PLAIN, None, ["a"], ["/ep", "a"]),                 # args replace CMD only
    (PLAIN, ["x", "y"], None, ["x", "y"]),              # command replaces ENTRYPOINT and drops CMD
    (PLAIN, ["x"], ["a", "b"], ["x", "a", "b"]),
    (NO_ENTRYPOINT, None, None, ["sh"]),
    (NO_ENTRYPOINT, None, ["ls", "-l"], ["ls", "-l"]),  # no ENTRYPOINT: args are the whole command
    (Image(runs="test"), None, None, []),
])
def test_kubernetes_argv(entry: Image, command: list[str] | None, args: list[str] | None,
                         argv: list[str]) -> None:
    assert kubernetes_argv(entry, command, args) == argv


def which(name: str) -> str:
    path = shutil.which(name, path=catalog.IMAGE_PATH)
    assert path is not None, name
    return path


@pytest.mark.parametrize(("image", "command", "args", "argv"), [
    ("debian", None, None, ["bash"]),
    ("ubuntu:22.04", ["sh", "-c", "echo hi"], None, ["sh", "-c", "echo hi"]),
    ("busybox", None, None, ["sh"]),
    ("busybox", ["sleep"], ["3600"], ["sleep", "3600"]),
    ("alpine", None, None, ["/bin/sh"]),
    ("alpine", ["/bin/sh", "-c"], ["true"], ["/bin/sh", "-c", "true"]),
    ("alpine", ["/bin/ash", "-c", "true"], None, ["sh", "-c", "true"]),        # ash: the host's sh stands in
    ("curlimages/curl", None, None, ["curl"]),
    ("curlimages/curl", None, ["-sS", "http://rebel-base"], ["curl", "-sS", "http://rebel-base"]),
    ("curlimages/curl", None, ["http://rebel-base"], ["curl", "http://rebel-base"]),
    ("curlimages/curl", None, ["sh", "-c", "curl x"], ["sh", "-c", "curl x"]),
    ("curlimages/curl", ["sh", "-c"], ["curl x"], ["sh", "-c", "curl x"]),
    ("registry.k8s.io/pause:3.2", None, None, ["sleep", "infinity"]),
])
def test_host_binaries(image: str, command: list[str] | None, args: list[str] | None, argv: list[str],
                       tmp_path: Path) -> None:
    program = resolve(image, command, args, tmp_path)
    expected = [argv[0] if argv[0].startswith("/") else which(argv[0]), *argv[1:]]
    assert program.argv == expected
    assert Path(program.argv[0]).is_absolute()
    assert program.stop_signal == signal.SIGTERM
    assert program.env["PATH"] == catalog.IMAGE_PATH
    assert program.workdir == "/"


def test_netshoot_falls_back_to_a_shell_the_host_has(tmp_path: Path) -> None:
    program = resolve("nicolaka/netshoot", None, None, tmp_path)
    expected = shutil.which("zsh") or shutil.which("bash") or shutil.which("sh")
    assert program.argv == [expected]
    assert program.workdir == "/root"


def test_json_mock(tmp_path: Path) -> None:
    module = ["-m", "clustermesh.lab.node.images.json_mock"]
    assert resolve("docker.io/cilium/json-mock:1.2", None, None, tmp_path).argv == [sys.executable, *module]
    assert resolve("cilium/json-mock", None, ["--port", "8080"], tmp_path).argv == [
        sys.executable, *module, "--port", "8080"]
    assert resolve("cilium/json-mock", ["curl", "-s", "localhost"], None, tmp_path).argv == [
        which("curl"), "-s", "localhost"]


def test_clustermesh_image_runs_the_installed_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "clustermesh"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}: run the tests with the venv's python")
    assert resolve("clustermesh:dev", ["clustermesh", "operator"], ["--peering=clustermesh"], tmp_path).argv == [
        str(script), "operator", "--peering=clustermesh"]
    assert resolve("ghcr.io/x/clustermesh:v1", None, ["agent", "--node", "n1"], tmp_path).argv == [
        str(script), "agent", "--node", "n1"]


def test_etcd_images_run_debians_etcd(tmp_path: Path) -> None:
    etcd = require_binary("etcd")
    assert resolve("quay.io/coreos/etcd:v3.5.0", None, None, tmp_path).argv == [etcd]
    # where the image keeps the binary is not where Debian does: the same name on the host's PATH
    program = resolve("gcr.io/etcd-development/etcd:v3.5.9", ["/usr/local/bin/etcd", "--name", "s1"], None, tmp_path)
    assert program.argv == [etcd, "--name", "s1"]


@pytest.mark.parametrize(("image", "command", "args", "missing"), [
    ("debian", ["no-such-binary-in-the-lab"], None, "no-such-binary-in-the-lab"),
    ("busybox", None, ["-c", "echo"], "-c"),   # busybox has no ENTRYPOINT: Kubernetes runs "-c" too
    ("alpine", ["./run.sh"], None, "./run.sh"),
    ("cilium/json-mock", ["/docker-entrypoint.sh"], None, "/docker-entrypoint.sh"),
])
def test_command_not_found(image: str, command: list[str] | None, args: list[str] | None, missing: str,
                           tmp_path: Path) -> None:
    with pytest.raises(CommandNotFound) as err:
        resolve(image, command, args, tmp_path)
    assert f'exec: "{missing}": executable file not found in $PATH' in str(err.value)
    assert f'image "{image}"' in str(err.value)


# --- nginx ---------------------------------------------------------------------------------------------------

def test_nginx_conf_keeps_writable_paths_in_scratch(tmp_path: Path) -> None:
    scratch = tmp_path / "c"
    conf = catalog.write_nginx_conf(scratch)
    text = conf.read_text()
    assert conf == scratch / "nginx.conf"
    for line in ("daemon off;", "worker_processes 1;", f"pid {scratch}/nginx.pid;", "error_log stderr notice;",
                 "include /etc/nginx/mime.types;", "access_log /dev/stdout main;", "listen 80;",
                 "root /usr/share/nginx/html;", "index index.html index.htm;"):
        assert line in text
    for name in catalog.NGINX_TEMP_DIRS:
        assert f"{name}_temp_path {scratch}/nginx-temp/{name};" in text
        assert (scratch / "nginx-temp" / name).stat().st_mode & 0o777 == 0o777
    assert not re.search(r"^\s*user\s", text, re.M)  # as root, workers run as nobody
    writable = re.findall(r"^\s*(?:pid|\w+_temp_path)\s+(\S+);", text, re.M)
    assert len(writable) == 1 + len(catalog.NGINX_TEMP_DIRS)
    assert all(path.startswith(f"{scratch}/") for path in writable)


def test_nginx_conf_leaves_out_what_the_command_line_sets(tmp_path: Path) -> None:
    text = catalog.write_nginx_conf(tmp_path, port=8080, skip={"daemon", "worker_processes"},
                                    uwsgi=False, scgi=False).read_text()
    assert "daemon" not in text and "worker_processes" not in text
    assert "uwsgi_temp_path" not in text and "scgi_temp_path" not in text
    assert "listen 8080;" in text


def nginx_or_skip() -> str:
    return require_binary("nginx", "apt-get install nginx-light (scripts/setup.sh does)")


def test_nginx_image(tmp_path: Path) -> None:
    nginx = nginx_or_skip()
    program = resolve("docker.io/nginx:1.15.8", None, None, tmp_path)
    conf = tmp_path / "nginx.conf"
    assert program.argv[:3] == [nginx, "-c", str(conf)]
    assert program.argv[-2:] == ["-g", "daemon off;"]
    assert program.stop_signal == signal.SIGQUIT
    assert "daemon off;" not in conf.read_text()  # the CMD's -g says it; nginx refuses it twice
    check = subprocess.run([*program.argv, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(("command", "args", "tail"), [
    (["nginx"], None, []),
    (["nginx-debug", "-g", "daemon off; worker_processes 2;"], None, ["-g", "daemon off; worker_processes 2;"]),
    (None, ["nginx", "-gdaemon off;"], ["-gdaemon off;"]),
])
def test_nginx_commands_get_the_generated_config(command: list[str] | None, args: list[str] | None,
                                                 tail: list[str], tmp_path: Path) -> None:
    nginx = nginx_or_skip()
    program = resolve("nginx:1.25", command, args, tmp_path)
    assert program.argv[:3] == [nginx, "-c", str(tmp_path / "nginx.conf")]
    assert program.argv[-len(tail):] == tail if tail else program.argv[-2:] == ["-e", "stderr"]
    check = subprocess.run([*program.argv, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_nginx_with_its_own_config(tmp_path: Path) -> None:
    nginx = nginx_or_skip()
    program = resolve("nginx", ["nginx", "-c", "/etc/mine.conf", "-g", "daemon off;"], None, tmp_path)
    assert program.argv == [nginx, "-c", "/etc/mine.conf", "-g", "daemon off;"]
    assert not (tmp_path / "nginx.conf").exists()


def test_nginx_serves_a_configmap_page_as_the_image_does(tmp_path: Path) -> None:
    """The rebel-base container for real, in a throwaway network and mount namespace."""
    require_root()
    nginx_or_skip()
    for binary in ("unshare", "ip", "curl"):
        require_binary(binary)
    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text('{"Galaxy": "Alderaan", "Cluster": "Cluster-1"}\n')
    html.chmod(0o755)
    program = resolve("docker.io/nginx:1.15.8", None, None, tmp_path / "scratch")
    quoted = " ".join(f"'{a}'" for a in program.argv)
    script = f"""set -e
ip link set lo up
mount --bind {html} /usr/share/nginx/html
{quoted} > {tmp_path}/out.log 2> {tmp_path}/err.log &
for i in $(seq 50); do curl -sf localhost && break; sleep 0.1; done > {tmp_path}/answer
curl -s -o /dev/null -w '%{{http_code}}' localhost/nope > {tmp_path}/missing
kill -QUIT $!
wait $!
"""
    run = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    err = (tmp_path / "err.log").read_text() if (tmp_path / "err.log").exists() else ""
    assert run.returncode == 0, run.stderr + err
    assert json.loads((tmp_path / "answer").read_text()) == {"Galaxy": "Alderaan", "Cluster": "Cluster-1"}
    assert (tmp_path / "missing").read_text() == "404"
    assert '"GET / HTTP/1.1" 200' in (tmp_path / "out.log").read_text()  # the access log is the container's stdout


# --- json-mock -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "status", "body"), [
    ("/", 200, json_mock.DEFAULT_DB),
    ("/db", 200, json_mock.DEFAULT_DB),
    ("/public", 200, [{"id": 1, "body": "public information"}]),
    ("/private/1", 200, {"id": 1, "body": "secret information"}),
    ("/public?_limit=1", 200, [{"id": 1, "body": "public information"}]),
    ("/public/2", 404, {}),
    ("/nothing", 404, {}),
    ("/public/1/more", 404, {}),
])
def test_json_mock_answers(path: str, status: int, body: Any) -> None:
    assert json_mock.answer(json_mock.DEFAULT_DB, path) == (status, body)


def test_json_mock_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "clustermesh.lab.node.images.json_mock", "--host", "127.0.0.1",
                             "--port", "0", "--watch", "/default.json", "--middlewares", "/auth-header.js"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        port = int(banner.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/public", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/json")
            assert json.loads(resp.read()) == json_mock.DEFAULT_DB["public"]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
        assert err.value.code == 404
        proc.send_signal(signal.SIGTERM)
        # A bound, not a speed: a server that ignored SIGTERM would never exit (a kubelet kills it
        # after the pod's grace period); a loaded machine may take a few seconds to run the handler.
        assert proc.wait(timeout=30) == 0
        out, errout = proc.communicate()
        assert out.splitlines() == [line for line in out.splitlines() if line.startswith("GET /")]
        assert [line.split()[:3] for line in out.splitlines()] == [["GET", "/public", "200"], ["GET", "/nope", "404"]]
        assert "ignoring json-server options --middlewares" in errout
    finally:
        proc.kill()
        proc.wait()


# --- the Star Wars manifests -------------------------------------------------------------------------------------

def manifests(cluster: int) -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((STARWARS / f"cluster{cluster}.yaml").read_text()) if d]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(objects) == len(docs) == 4
    return objects


@pytest.mark.parametrize("cluster", [1, 2])
def test_starwars_manifests(cluster: int) -> None:
    objects = manifests(cluster)
    assert all("namespace" not in obj["metadata"] for obj in objects.values())

    service = objects["Service", "rebel-base"]
    assert service["metadata"]["annotations"]["service.cilium.io/global"] == "true"
    assert service["spec"]["selector"] == {"name": "rebel-base"}
    assert [p["port"] for p in service["spec"]["ports"]] == [80]

    page = objects["ConfigMap", "rebel-base-response"]["data"]["message"]
    assert json.loads(page) == {"Galaxy": "Alderaan", "Cluster": f"Cluster-{cluster}"}

    base = objects["Deployment", "rebel-base"]["spec"]
    assert base["replicas"] == 2
    assert base["template"]["metadata"]["labels"] == {"name": "rebel-base"}
    (nginx,) = base["template"]["spec"]["containers"]
    assert nginx["image"] == "docker.io/nginx:1.15.8"
    assert nginx["volumeMounts"] == [{"name": "html", "mountPath": "/usr/share/nginx/html/"}]
    (volume,) = base["template"]["spec"]["volumes"]
    assert volume["configMap"] == {"name": "rebel-base-response", "items": [{"key": "message", "path": "index.html"}]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert nginx[probe] == {"httpGet": {"path": "/", "port": 80}, "periodSeconds": 1}

    xwing = objects["Deployment", "x-wing"]["spec"]
    assert xwing["replicas"] == 2
    (container,) = xwing["template"]["spec"]["containers"]
    assert container["image"] == "docker.io/cilium/json-mock:1.2"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe] == {"exec": {"command": ["curl", "-sS", "-o", "/dev/null", "localhost"]}}


def test_starwars_clusters_differ_only_in_the_page() -> None:
    one, two = manifests(1), manifests(2)
    one["ConfigMap", "rebel-base-response"]["data"] = two["ConfigMap", "rebel-base-response"]["data"] = {}
    assert one == two


@pytest.mark.parametrize("cluster", [1, 2])
def test_starwars_images_are_in_the_catalog(cluster: int, tmp_path: Path) -> None:
    for obj in manifests(cluster).values():
        if obj["kind"] != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            catalog.lookup(container["image"])
            if "nginx" in container["image"]:
                nginx_or_skip()
            program = resolve(container["image"], container.get("command"), container.get("args"), tmp_path)
            assert Path(program.argv[0]).is_absolute()
            probe = container["livenessProbe"].get("exec")
            if probe:  # exec probes run the host's binary of that name
                assert shutil.which(probe["command"][0])
