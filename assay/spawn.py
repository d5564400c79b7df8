"""Starting `-- COMMAND` already inside the scope, so not even its first instruction runs unobserved."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from typing import Callable, Optional, Sequence

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
RESOLV_CONF = b"/etc/resolv.conf"


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _own_resolv_conf(libc, path: bytes) -> Optional[str]:
    """In the child: a private mount namespace in which /etc/resolv.conf is `path` (the proxy's).
    Done before the child joins the scope, where mounts may be refused (docs/hardening.md)."""
    steps = ((lambda: libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)"),
             (lambda: libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private"),
             (lambda: libc.mount(path, RESOLV_CONF, None, MS_BIND, None), "bind-mount /etc/resolv.conf"))
    for call, what in steps:
        if call() != 0:
            return f"{what}: {os.strerror(ctypes.get_errno())}"
    return None


def spawn_in_scope(argv: Sequence[str], add_to_scope: Callable[[int], None],
                   resolv_conf: Optional[str] = None) -> int:
    """Forks; the child waits on a pipe until add_to_scope(its pid) has returned, then execs argv.
    If the monitor dies or add_to_scope raises first, the child exits without running anything.
    With `resolv_conf`, the child first gets its own mount namespace seeing that file as
    /etc/resolv.conf; if that fails, nothing runs and the error is raised here."""
    libc = _libc() if resolv_conf else None   # loaded before the fork: no dlopen in the child
    r, w = os.pipe()
    sr, sw = os.pipe()                         # the child's "namespace ready" (or why not)
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(w)
            os.close(sr)
            err = _own_resolv_conf(libc, os.fsencode(resolv_conf)) if resolv_conf else None
            os.write(sw, (err or "ok").encode()[:500])
            os.close(sw)
            if err:
                os._exit(126)
            if os.read(r, 1) != b"x":
                os._exit(126)  # the monitor died before scoping us: never run unobserved
            os.close(r)
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            os.execvp(argv[0], list(argv))
        except OSError as e:
            os.write(2, f"assay: cannot run {argv[0]}: {e.strerror}\n".encode())
            os._exit(127 if e.errno == 2 else 126)
        finally:
            os._exit(126)
    os.close(r)
    os.close(sw)
    status = os.read(sr, 512).decode(errors="replace")
    os.close(sr)
    try:
        if status != "ok":
            from assay.errors import AssayError, EXIT_BPF
            raise AssayError(f"cannot give the command its resolver (the DNS proxy): {status or 'child died'}",
                             EXIT_BPF)
        add_to_scope(pid)
    except BaseException:
        os.close(w)  # child sees EOF and exits without running the command
        os.waitpid(pid, 0)
        raise
    os.write(w, b"x")
    os.close(w)
    return pid
