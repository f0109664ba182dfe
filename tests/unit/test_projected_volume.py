"""The lab kubelet's Secret and ConfigMap volumes: every file of a version switches at once."""

from __future__ import annotations

from pathlib import Path

from clustermesh.lab.node.volumes import write_projected


def read(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def test_a_new_version_switches_every_file_with_one_rename(tmp_path: Path) -> None:
    assert write_projected(tmp_path, {"tls.crt": b"cert-1", "tls.key": b"key-1", "old": b"x"}, 0o600)
    assert read(tmp_path) == {"tls.crt": b"cert-1", "tls.key": b"key-1", "old": b"x"}
    first = (tmp_path / "..data").resolve()
    assert (first / "tls.key").stat().st_mode & 0o777 == 0o600
    # The names are links through ..data: a reader holding ..data's old target keeps a matching pair.
    assert all((tmp_path / n).is_symlink() and str((tmp_path / n).readlink()) == f"..data/{n}"
               for n in ("tls.crt", "tls.key"))
    assert write_projected(tmp_path, {"tls.crt": b"cert-2", "tls.key": b"key-2"})
    assert read(tmp_path) == {"tls.crt": b"cert-2", "tls.key": b"key-2"}
    assert not first.exists(), "the previous version is removed"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("..")) == \
        sorted(["..data", (tmp_path / "..data").readlink().name])


def test_an_unchanged_version_writes_nothing(tmp_path: Path) -> None:
    write_projected(tmp_path, {"a": b"1"})
    version = (tmp_path / "..data").readlink()
    assert not write_projected(tmp_path, {"a": b"1"})
    assert (tmp_path / "..data").readlink() == version


def test_files_written_the_old_way_become_links(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"plain")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b").write_bytes(b"plain")
    assert write_projected(tmp_path, {"a": b"1", "dir/b": b"2"})
    assert (tmp_path / "a").is_symlink() and (tmp_path / "a").read_bytes() == b"1"
    assert (tmp_path / "dir").is_symlink() and (tmp_path / "dir" / "b").read_bytes() == b"2"
