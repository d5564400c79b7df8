"""Loads the few kernel modules a guest test needs (the guest has no modprobe): the files come
from the row's kernel package (kernel-matrix/fetch.py MODULES), dependencies first."""
from __future__ import annotations

import ctypes
import errno
import lzma
import os
import platform
from typing import Dict, List

MODULE_DIR = "/opt/assay/modules"
SYS_INIT_MODULE = {"x86_64": 175, "aarch64": 105}


def _available() -> Dict[str, str]:
    out = {}
    for f in os.listdir(MODULE_DIR) if os.path.isdir(MODULE_DIR) else ():
        out[f.split(".ko")[0].replace("-", "_")] = os.path.join(MODULE_DIR, f)
    return out


def _image(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return lzma.decompress(data) if path.endswith(".xz") else data


def depends(image: bytes) -> List[str]:
    """The `depends=` entry of the module's .modinfo section."""
    at = image.find(b"\0depends=")
    if at < 0:
        return []
    value = image[at + len(b"\0depends="):image.index(b"\0", at + 1)]
    return [d.decode().replace("-", "_") for d in value.split(b",") if d]


def load(name: str) -> None:
    """Loads `name` and what it depends on; a dependency without a file is built in."""
    name = name.replace("-", "_")
    if os.path.isdir(f"/sys/module/{name}"):
        return
    files = _available()
    if name not in files:
        raise FileNotFoundError(f"no module {name} in {MODULE_DIR} (have: {sorted(files)})")
    image = _image(files[name])
    for dep in depends(image):
        if dep in files:
            load(dep)
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(image, len(image))
    if libc.syscall(SYS_INIT_MODULE[platform.machine()], buf, ctypes.c_ulong(len(image)), b"") != 0:
        err = ctypes.get_errno()
        if err != errno.EEXIST:
            raise OSError(err, f"init_module({name}): {os.strerror(err)}")
