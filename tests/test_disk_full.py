"""A full disk or quota during a save (issue 24, category 2): one ``error:`` line naming the file
being written and the bytes it needs; the previous file of that name intact, no NAME.tmp left.

For real where this machine allows it: a small tmpfs mounted for the test (root and mount
permission; skipped otherwise), filled by fairseq-train's own save and by the checkpoint tool.
Everywhere: ENOSPC and EDQUOT emulated at the file object ``atomic_write`` writes to (its
``write`` and ``os.fsync``), the lowest level a test can reach without root.
"""

import errno
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fairseq_smoe  # noqa: E402,F401
from fairseq_smoe import checkpoint_io, checkpoints  # noqa: E402
from fairseq_smoe.checkpoint_io import DiskFullError  # noqa: E402

from test_checkpoint_io import binarize, num_updates, train_args, train_in_process  # noqa: E402


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def serialized_size(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


class Disk:
    """A tmpfs of its own (256 MiB, resized by ``limit``), unmounted at the end of the test."""

    def __init__(self, path):
        self.path = path

    def used(self):
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def limit(self, nbytes):
        page = os.sysconf("SC_PAGE_SIZE")
        nbytes = -(-int(nbytes) // page) * page
        subprocess.run(["mount", "-o", f"remount,size={nbytes}", str(self.path)], check=True,
                       capture_output=True, timeout=60)


@pytest.fixture
def disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the real full-disk tests need a tmpfs (the emulated ones run)")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {err}")
    try:
        yield Disk(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


def leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- for real


def test_fairseq_train_save_on_a_full_disk_keeps_checkpoint_last(disk, tmp_path):
    """Update 2 saved; room left for checkpoint_1_4.pt but not for its copy to checkpoint_last.pt:
    the user sees one line naming checkpoint_last.pt and its size; checkpoint_last.pt is still
    update 2's, nothing .tmp is left; with room again, the same command resumes and finishes."""
    data_bin, save = tmp_path / "data-bin", disk.path / "save"
    binarize(data_bin)
    train_in_process(train_args(data_bin, save, 2, "--disable-validation"))
    assert sorted(p.name for p in save.iterdir()) == ["checkpoint_1_2.pt", "checkpoint_last.pt"]
    last, size = save / "checkpoint_last.pt", (save / "checkpoint_last.pt").stat().st_size
    before = sha(last)
    disk.limit(disk.used() + size * 3 // 2)

    cmd = [sys.executable, "-m", "fairseq_cli.train", *train_args(data_bin, save, 4, "--disable-validation")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode != 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    line = run.stderr.strip().splitlines()[-1]
    needed = (save / "checkpoint_1_4.pt").stat().st_size  # written whole; the copy did not fit
    assert line.startswith(f"error: checkpoint {last} could not be written: no space left on device "
                           f"(needs "), line
    assert f"({needed:,} bytes)" in line and "checkpoint_last.pt is still the previous file" in line, line
    assert f"room in {save}" in line, line
    assert sha(last) == before and num_updates(last) == 2
    assert leftovers(save) == []

    disk.limit(256 << 20)
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert num_updates(last) == 4 and leftovers(save) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk_full")
    binarize(tmp / "data-bin")
    train_in_process(train_args(tmp / "data-bin", tmp / "save", 2, "--disable-validation"))
    return tmp / "save" / "checkpoint_last.pt"


def test_checkpoint_tool_on_a_full_disk_leaves_nothing(disk, trained, tmp_path, capsys):
    """reshard into 2 shards where shard 0 fits and shard 1 does not: one line naming shard 1's
    file and its size, exit 1, and no file of the set left (neither shard 0 nor any .tmp)."""
    assert checkpoints.main(["reshard", str(trained), str(tmp_path / "probe" / "idx.pt"), "--world-size", "2"]) == 0
    probe = checkpoints.read_index(tmp_path / "probe" / "idx.pt")["files"]
    capsys.readouterr()
    out = disk.path / "out"
    out.mkdir()
    disk.limit(disk.used() + probe[0]["bytes"] + probe[1]["bytes"] // 2)
    assert checkpoints.main(["reshard", str(trained), str(out / "idx.pt"), "--world-size", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    shard1 = probe[1]["file"].split(".")
    assert err[0].startswith(f"error: checkpoint {out}/ep-shard.u2.") and ".1-of-2.pt could not be written: " \
        "no space left on device (needs " in err[0], err[0]
    assert f"({probe[1]['bytes']:,} bytes)" in err[0] and "nothing was written" in err[0], (err[0], shard1)
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- emulated


class FillingFile:
    """The file atomic_write opens, on a disk with ``room`` bytes left: a write past it writes
    what fits and raises ENOSPC, as the kernel's write(2) does."""

    def __init__(self, f, room):
        self._f, self.room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self._f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def filling(monkeypatch, room):
    real = open

    def fake_open(path, mode="r", *args, **kwargs):
        return FillingFile(real(path, mode, *args, **kwargs), room)

    monkeypatch.setattr(checkpoint_io, "open", fake_open, raising=False)


def test_torch_save_on_a_full_disk_names_the_file_and_its_size(tmp_path, monkeypatch):
    dst = tmp_path / "checkpoint_last.pt"
    checkpoint_io.atomic_write(dst, lambda f: torch.save({"w": torch.ones(10)}, f))
    before = dst.read_bytes()
    big = {"w": torch.zeros(1 << 18)}  # 1 MiB
    filling(monkeypatch, 100_000)
    with pytest.raises(DiskFullError) as err:
        checkpoint_io.atomic_write(dst, lambda f: torch.save(big, f))
    needed = serialized_size(big)
    assert err.value.needed == needed and err.value.written > 0
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {dst} could not be written: no space left on device (needs 1.0 MiB "
                          f"({needed:,} bytes), "), msg
    assert "checkpoint_last.pt is still the previous file, no checkpoint_last.pt.tmp is left" in msg
    assert dst.read_bytes() == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    checkpoint_io.atomic_write(dst, lambda f: torch.save(big, f))  # with room, it is written
    assert torch.load(dst, weights_only=True)["w"].shape == (1 << 18,)


def test_a_copy_or_a_quota_at_fsync_also_gives_the_one_line(tmp_path, monkeypatch):
    src, dst = tmp_path / "src.pt", tmp_path / "checkpoint_best.pt"
    src.write_bytes(b"x" * 300_000)
    filling(monkeypatch, 1000)
    with pytest.raises(DiskFullError) as err:
        checkpoint_io.atomic_copy(src, dst)  # fairseq's copy of a save to checkpoint_last/best
    assert "(needs 293.0 KiB (300,000 bytes)" in str(err.value) and "nothing was written" in str(err.value)
    assert leftovers(tmp_path) == [] and not dst.exists()
    monkeypatch.undo()

    def quota(fd):  # NFS and quota'd file systems may report only when the data is flushed
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    dst.write_bytes(b"old")
    monkeypatch.setattr(checkpoint_io.os, "fsync", quota)
    with pytest.raises(DiskFullError) as err:
        checkpoint_io.atomic_write(dst, lambda f: f.write(b"y" * 5000))
    assert str(err.value).startswith(f"checkpoint {dst} could not be written: disk quota exceeded (needs "
                                     f"4.9 KiB (5,000 bytes); checkpoint_best.pt is still the previous file")
    assert dst.read_bytes() == b"old" and leftovers(tmp_path) == []
    # anything else keeps its own exception (and its traceback): not every OSError is a full disk
    monkeypatch.setattr(checkpoint_io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(OSError) as err:
        checkpoint_io.atomic_write(dst, lambda f: f.write(b"z"))
    assert not isinstance(err.value, DiskFullError) and dst.read_bytes() == b"old"
