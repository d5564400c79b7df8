"""Shared fixtures: the built object, and skips with a stated reason where root or BPF is missing."""
from __future__ import annotations

import os
import sys

import pytest

from assay.monitor import default_object_path


def bpf_unavailable_reason():
    if os.geteuid() != 0:
        return "needs root (BPF programs and maps)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
    if not os.path.exists(default_object_path()):
        return f"BPF object not built ({default_object_path()}): run `make bpf`"
    return None


def pytest_collection_modifyitems(config, items):
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if "root" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def obj_path():
    return default_object_path()


@pytest.fixture
def assay_cmd():
    """The CLI as a user runs it, in this interpreter."""
    return [sys.executable, "-m", "assay"]


@pytest.fixture(autouse=True)
def _structlog_config():
    """Tests that run the CLI in-process leave structlog printing to their captured (then closed)
    stderr; later tests that log would fail on it. Each test gets the configuration back."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
