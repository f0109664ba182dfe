"""The Dockerfile, checked without a Docker engine (there is none here): its base is Debian bookworm,
every package it installs exists in bookworm, every file it copies exists and is not ignored, its
entry point is a console script of the package, and what deploy/ runs in the image is in it."""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from clustermesh.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return out


def apt_packages(steps: list[tuple[str, str]]) -> list[str]:
    packages = []
    for word, args in steps:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            tokens = shlex.split(command)
            if "apt-get" in tokens and "install" in tokens:
                after = tokens[tokens.index("install") + 1:]
                packages += [t for t in after if not t.startswith("-")]
    return packages


def copies(steps: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    out = []
    for word, args in steps:
        if word in ("COPY", "ADD"):
            if any(t.startswith("--from") for t in shlex.split(args)):
                continue  # from another stage, not from the build context (stage_copies)
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]
            out.append((tokens[:-1], tokens[-1]))
    return out


def stage_copies(steps: list[tuple[str, str]]) -> dict[str, list[str]]:
    """COPY --from=STAGE: the stage's image -> the files copied from it."""
    images = {}
    for word, args in steps:
        if word == "FROM" and " AS " in args.upper():
            image, _, name = args.partition(" AS ") if " AS " in args else args.partition(" as ")
            images[name.strip()] = image.strip()
    out: dict[str, list[str]] = {}
    for word, args in steps:
        tokens = shlex.split(args)
        stage = next((t.split("=", 1)[1] for t in tokens if t.startswith("--from=")), None)
        if word == "COPY" and stage:
            out.setdefault(images.get(stage, stage), []).extend(t for t in tokens[:-1] if not t.startswith("--"))
    return out


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, args in steps:
        if word == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def exec_form(steps: list[tuple[str, str]], name: str) -> list[str]:
    import json

    args = [a for w, a in steps if w == name]
    assert len(args) == 1, f"one {name}"
    value = json.loads(args[0])  # exec form: no shell between the kubelet's signals and the process
    assert isinstance(value, list)
    return [str(v) for v in value]


def clustermesh_subcommands() -> set[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("clustermesh has no subcommands")


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions((REPO / "Dockerfile").read_text())


def test_parser_joins_continuations_and_finds_packages() -> None:
    steps = instructions("FROM x\n# c\nRUN a && \\\n  apt-get install -y --no-install-recommends \\\n   p1 \\\n"
                         "   p2 && rm -rf y\nCOPY --chown=1 a b /d/\n")
    assert apt_packages(steps) == ["p1", "p2"]
    assert copies(steps) == [(["a", "b"], "/d/")]


def test_base_image_is_debian_bookworm(steps: list[tuple[str, str]]) -> None:
    bases = [a.split()[0] for w, a in steps if w == "FROM"]
    assert bases and re.fullmatch(r"(docker\.io/)?(library/)?debian:bookworm(-slim)?(@sha256:[0-9a-f]+)?", bases[-1])
    for base in bases[:-1]:  # stages: only etcd's own release image
        assert base.startswith("gcr.io/etcd-development/etcd:v"), base


def test_the_image_runs_an_etcd_without_cve_2023_32082(steps: list[tuple[str, str]]) -> None:
    """deploy/'s store runs etcd 3.4.26 or later (or 3.5+): LeaseTimeToLive with keys checks permissions
    there. Debian's 3.4.23 (the lab's) does not."""
    copied = stage_copies(steps)
    etcd_images = [image for image, files in copied.items() if "/usr/local/bin/etcd" in files]
    assert len(etcd_images) == 1, copied
    major, minor, patch = (int(x) for x in re.search(r":v(\d+)\.(\d+)\.(\d+)", etcd_images[0]).groups())
    assert (major, minor, patch) >= (3, 4, 26) and (major, minor) < (3, 6), etcd_images[0]
    assert "/usr/local/bin/etcdctl" in copied[etcd_images[0]]


def test_every_apt_package_exists_in_bookworm(steps: list[tuple[str, str]]) -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("apt-cache not found: this check needs a Debian machine")
    release = Path("/etc/os-release").read_text()
    if "VERSION_CODENAME=bookworm" not in release:
        pytest.skip("this machine is not Debian bookworm: apt-cache would answer for another release")
    packages = apt_packages(steps)
    assert {"python3", "python3-bpfcc"} <= set(packages)
    missing = [p for p in packages
               if subprocess.run(["apt-cache", "show", p], capture_output=True, timeout=60).returncode != 0]
    assert missing == [], f"not in bookworm: {missing} (apt-cache show fails)"


def test_every_copied_file_exists_and_is_in_the_build_context(steps: list[tuple[str, str]]) -> None:
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = [s for srcs, _ in copies(steps) for s in srcs]
    assert {"pyproject.toml", "clustermesh", "bpf"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        hits = [p for p in ignored if fnmatch.fnmatch(source, p) or fnmatch.fnmatch(source, p.rstrip("/"))]
        assert hits == [], f"COPY {source} is excluded by .dockerignore {hits}"
    # setuptools reads the readme named in pyproject.toml while building the package.
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    assert readme in sources


def test_entry_point_is_a_console_script_of_the_package(steps: list[tuple[str, str]]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entry = exec_form(steps, "ENTRYPOINT")
    assert entry == ["clustermesh"]
    assert entry[0] in scripts, f"ENTRYPOINT {entry[0]} is not in [project.scripts] {sorted(scripts)}"


def test_bpf_dir_env_is_where_the_programs_are_copied(steps: list[tuple[str, str]]) -> None:
    env = env_of(steps)
    target = {dest.rstrip("/") for srcs, dest in copies(steps) if srcs == ["bpf"]}
    assert target == {env["CLUSTERMESH_BPF_DIR"]}
    agent = (REPO / "deploy" / "base" / "agent.yaml").read_text()
    assert f"value: {env['CLUSTERMESH_BPF_DIR']}" in agent


def test_what_deploy_runs_is_in_the_image() -> None:
    """Each command the manifests and the store script give: a clustermesh subcommand that exists,
    or a binary from a package the Dockerfile installs (or one every Debian image has)."""
    import yaml

    steps = instructions((REPO / "Dockerfile").read_text())
    packages = set(apt_packages(steps))
    subcommands = clustermesh_subcommands()
    commands: set[str] = set()
    for path in (REPO / "deploy" / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = ((doc or {}).get("spec") or {}).get("template", {}).get("spec", {})
            for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
                command = container["command"]
                commands.add(command[0])
                if command[0] == "clustermesh":
                    assert command[1] in subcommands, f"{path.name}: clustermesh {command[1]} does not exist"
    script = (REPO / "deploy" / "base" / "store.sh").read_text()
    commands |= {"etcd", "etcdctl", "sha256sum"} if "etcdctl" in script else {"etcd"}
    essential = {"sh", "sha256sum", "cut", "cat", "basename", "mkdir", "rm", "sleep", "readlink", "touch",
                 "ls", "tr", "grep", "date", "kill"}  # dash, coreutils, grep: in every Debian image
    from_stages = {Path(f).name for files in stage_copies(steps).values() for f in files}
    for command in sorted(commands - {"clustermesh"} - essential - from_stages):
        binary = shutil.which(command)
        if binary is None:
            pytest.skip(f"{command} is not installed here; cannot look up its package")
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(binary)], capture_output=True, text=True)
        package = owner.stdout.split(":", 1)[0]
        assert package in packages, f"{command} comes from {package or '?'}, which the Dockerfile does not install"
