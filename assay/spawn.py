"""Starting `-- COMMAND` already inside the scope, so not even its first instruction runs unobserved."""
from __future__ import annotations

import os
import signal
from typing import Callable, Sequence


def spawn_in_scope(argv: Sequence[str], add_to_scope: Callable[[int], None]) -> int:
    """Forks; the child waits on a pipe until add_to_scope(its pid) has returned, then execs argv.
    If the monitor dies or add_to_scope raises first, the child exits without running anything."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(w)
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
    try:
        add_to_scope(pid)
    except BaseException:
        os.close(w)  # child sees EOF and exits without running the command
        os.waitpid(pid, 0)
        raise
    os.write(w, b"x")
    os.close(w)
    return pid
