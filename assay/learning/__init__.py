"""Learning mode: record runs, merge them into a stability profile, and generate an enforceable policy."""
from assay import __version__
from assay.learning.constants import CLASSES, FILE_OPEN, NET_CONNECT, PROC_EXEC
from assay.learning.times import canonical_time
from assay.learning.run import Run, RunHeader, RunItem, digest_text, dump_run, fingerprint, parse_run, read_run
from assay.learning.atomic import atomic_write
from assay.learning.recorder import RunRecorder
from assay.learning.generalisation import generalise
from assay.learning.profile import (Entry, FingerprintMismatch, Profile, RunInfo, UpdateResult, dump_profile,
                                    load_profile, merge_run, parse_profile, profile_init, profile_update)
from assay.learning.gate import Decision, gate, runs_needed, score, wilson_lower_bound
from assay.learning.generate import generate
from assay.learning.show import show_profile
