"""Case 11: a bundle archive with `../`, absolute paths, links, devices or FIFOs is refused whole before anything is
written; a good archive works wherever a bundle directory does (`inspect`, `run`)."""
from __future__ import annotations

import stat
import tempfile
import zipfile

import pytest

from afedge.bundle import BundleError, unzip_bundle, zip_bundle
from tests.reliability.conftest import assert_one_line_error, cli, tree

UNIX = 3  # ZipInfo.create_system of archives made on Unix (mode bits in external_attr)


def member(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system, info.external_attr = UNIX, mode << 16
    return info


HOSTILE = {
    "parent": (member("../evil.txt"), "an absolute or parent-relative path"),
    "nested-parent": (member("reference/../../evil.txt"), "an absolute or parent-relative path"),
    "absolute": (member("/tmp/afedge-evil.txt"), "an absolute or parent-relative path"),
    "backslash": (member("..\\evil.txt"), "an absolute or parent-relative path"),
    "symlink": (member("link.json", stat.S_IFLNK | 0o777), "a link"),
    "duplicate": (member("tokenizer.json"), "a duplicate name"),
    "device": (member("dev", stat.S_IFCHR | 0o600), "a device, FIFO or socket"),
    "fifo": (member("fifo", stat.S_IFIFO | 0o600), "a device, FIFO or socket"),
}


def hostile_zip(bundle_dir, path, bad: zipfile.ZipInfo):
    """The good bundle's files first (a streaming extractor would already have written them), then `bad`."""
    zip_bundle(bundle_dir, path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(bad, "../../etc/passwd" if stat.S_ISLNK(bad.external_attr >> 16) else "payload")
    return path


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_refuses_the_whole_archive(bundle_dir, tmp_path, case):
    bad, why = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    z = hostile_zip(bundle_dir, tmp_path / "evil.zip", bad)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(BundleError) as e:
        unzip_bundle(z, work / "dest")
    assert f"member '{bad.filename}' is {why}" in str(e.value) and "nothing was written" in str(e.value)
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "evil.txt").exists() and not (work / "evil.txt").exists()


def test_cli_refuses_a_hostile_archive_without_unpacking(bundle_dir, tmp_path, capsys, monkeypatch):
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    z = hostile_zip(bundle_dir, tmp_path / "evil.zip", HOSTILE["parent"][0])
    for cmd in (["inspect", z], ["run", z, "--tokens", "1"], ["parity", z]):
        rc, _, err = cli(capsys, *cmd)
        assert_one_line_error(rc, err, "evil.zip", "member '../evil.txt'", "whole archive is refused")
    assert made == []


def test_unzip_into_an_existing_bundle_keeps_it_when_the_archive_fails_to_verify(bundle_dir, tmp_path):
    """Safe member names but an unlisted extra file: the unpacked tree fails verification; dest is untouched."""
    dest = tmp_path / "dest"
    unzip_bundle(zip_bundle(bundle_dir, tmp_path / "good.zip"), dest)
    before = tree(dest)
    z = zip_bundle(bundle_dir, tmp_path / "extra.zip")
    with zipfile.ZipFile(z, "a") as f:
        f.writestr(member("extra.so"), b"\x7fELF")
    with pytest.raises(BundleError, match=r"not listed in the manifest: \['extra\.so'\]"):
        unzip_bundle(z, dest)
    assert tree(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "extra.zip", "good.zip"]


def test_a_good_archive_works_like_its_directory(bundle_dir, tmp_path, capsys):
    z = zip_bundle(bundle_dir, tmp_path / "bündle ☃.zip")
    rc, out, err = cli(capsys, "run", bundle_dir, "--runtime", "onnx", "--tokens", "5,6,7", "--max-new", "4")
    assert rc == 0, err
    rc2, out2, err2 = cli(capsys, "run", z, "--runtime", "onnx", "--tokens", "5,6,7", "--max-new", "4")
    assert rc2 == 0, err2
    assert out2 == out and len(out.split()) == 4
    rc, _, err = cli(capsys, "inspect", z)
    assert rc == 0 and "host" in err
