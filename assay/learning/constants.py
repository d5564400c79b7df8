"""Event classes and the other constants the learning modules share."""
from typing import Tuple

FILE_OPEN, NET_CONNECT, PROC_EXEC = "file_open", "net_connect", "proc_exec"
CLASSES = (FILE_OPEN, PROC_EXEC, NET_CONNECT)          # also the order of the generated rules
PATH_CLASSES = (FILE_OPEN, PROC_EXEC)
PROFILE_FORMAT = "assay-profile/1"
AT_FDCWD = -100
BUCKETS = ("allow", "needs_review", "deny", "skipped")
MODES = ("audit", "enforce")

Key = Tuple[str, str]
