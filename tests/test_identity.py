"""Rule keys name a file as the kernel's decisions see it: on btrfs, stat(2) shows a subvolume's own
anonymous device, while the inode's superblock (i_sb->s_dev, what the decisions read and what
/proc/self/mountinfo shows) has another; every key is written under both."""
import os
import shutil
import subprocess
import tempfile

import pytest

from assay import abi, enforce

pytestmark = pytest.mark.root


@pytest.fixture
def btrfs():
    if not shutil.which("mkfs.btrfs"):
        pytest.skip("needs mkfs.btrfs (btrfs-progs)")
    base = tempfile.mkdtemp(prefix="assay-btrfs-")
    img, mnt = os.path.join(base, "fs.img"), os.path.join(base, "mnt")
    os.mkdir(mnt)
    with open(img, "wb") as f:
        f.truncate(160 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "-f", img], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", img], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["mount", "-t", "btrfs", dev, mnt], check=True)
    try:
        subprocess.run(["btrfs", "-q", "subvolume", "create", os.path.join(mnt, "sub")], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)
        shutil.rmtree(base, ignore_errors=True)


def _mountinfo_dev(mnt):
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a = line.split()
            if a[4] == mnt:
                major, minor = (int(x) for x in a[2].split(":"))
                return os.makedev(major, minor)
    raise AssertionError(f"{mnt} not in mountinfo")


def test_a_btrfs_subvolume_file_is_keyed_by_its_superblock_too(btrfs):
    secret = os.path.join(btrfs, "sub", "secret")
    with open(secret, "w") as f:
        f.write("x")
    ident = enforce.identify(secret)
    sb = _mountinfo_dev(btrfs)
    assert ident.dev != sb                       # what made rules inert on btrfs before
    assert ident.sb_dev == sb
    keys = [abi.InodeKey.from_buffer_copy(k) for k in ident.keys()]
    want = {sb & 0xFFFFFFFF, (os.major(sb) << 20) | os.minor(sb)}
    assert want <= {k.dev for k in keys} and all(k.ino == ident.ino for k in keys)


def test_an_ordinary_filesystem_keeps_two_encodings(tmp_path):
    p = tmp_path / "f"
    p.write_text("x")
    ident = enforce.identify(str(p))
    assert ident.sb_dev in (None, ident.dev) and len(ident.devs()) <= 2
