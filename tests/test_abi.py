"""The Python mirror (assay/abi.py) against the compiled object's BTF: they cannot drift apart."""
import ctypes
import os

import pytest

from assay import abi, btf, events
from assay.monitor import default_object_path

pytestmark = pytest.mark.skipif(not os.path.exists(default_object_path()),
                                reason="BPF object not built: run `make bpf`")


@pytest.fixture(scope="module")
def obj_btf():
    return btf.from_elf(default_object_path())


@pytest.mark.parametrize("cname", sorted(abi.STRUCTS))
def test_struct_layout_matches_btf(obj_btf, cname):
    mirror = abi.STRUCTS[cname]
    size, members = obj_btf.struct(cname)
    assert ctypes.sizeof(mirror) == size, f"{cname}: size {ctypes.sizeof(mirror)} != BTF {size}"
    py = [(name, getattr(mirror, name).offset, ctypes.sizeof(t)) for name, t in mirror._fields_]
    c = [(m.name, m.offset, m.size) for m in members]
    assert py == c


@pytest.mark.parametrize("cname", sorted(abi.ENUMS))
def test_enum_values_match_btf(obj_btf, cname):
    pyenum, prefix = abi.ENUMS[cname]
    c = {k[len(prefix):]: v for k, v in obj_btf.enum(cname).items()}
    assert c == {m.name: int(m) for m in pyenum}


def test_struct_format_agrees_with_ctypes():
    for cls in abi.STRUCTS.values():
        import struct
        assert struct.calcsize(abi.struct_format(cls)) == ctypes.sizeof(cls)


def test_a_drifted_mirror_is_caught(obj_btf):
    # The check itself must be able to fail: a mirror with one field moved does not match.
    class Drifted(ctypes.Structure):
        _fields_ = [("ino", ctypes.c_uint64), ("gen", ctypes.c_uint32), ("dev", ctypes.c_uint32)]
    _, members = obj_btf.struct("assay_inode_key")
    assert [(n, getattr(Drifted, n).offset) for n, _ in Drifted._fields_] != [(m.name, m.offset) for m in members]


@pytest.mark.parametrize("op,family,raw,addr,verb", [
    (abi.NetOp.CONNECT, 2, bytes([127, 0, 0, 53]) + bytes(12), "127.0.0.53", "CONNECT 127.0.0.53:53"),
    (abi.NetOp.SENDMSG, 10, bytes(15) + b"\x01", "::1", "SENDMSG [::1]:53"),
])
def test_net_block_record_decodes_with_its_operation(op, family, raw, addr, verb):
    # A record laid out by the mirror decodes field for field, the operation included.
    ev = abi.NetBlockEvent(rule_id=3, action=int(abi.Action.DENY), family=family, port=53, protocol=17,
                           op=int(op))
    ev.hdr.type = int(abi.EventType.NET_BLOCKED)
    ev.hdr.pid = 42
    ctypes.memmove(ev.addr, raw, 16)
    out = events.Decoder({3: "no-dns"}).decode(bytes(ev))
    assert out["type"] == "net_blocked" and out["op"] == op.name.lower()
    assert (out["addr"], out["port"], out["protocol"], out["rule"]) == (addr, 53, "udp", "no-dns")
    assert f"BLOCKED {verb} rule=no-dns" in events.to_text(out)


@pytest.mark.parametrize("what,target,arg,fields,text", [
    (abi.Tamper.BPF_MAP, 17, 0, {"what": "bpf_map", "id": 17}, "TAMPER bpf_map -> id 17"),
    (abi.Tamper.SIGNAL, 99, 9, {"what": "signal", "target_pid": 99, "signal": "SIGKILL"},
     "TAMPER signal SIGKILL -> pid 99"),
    (abi.Tamper.PTRACE, 99, 0x12, {"what": "ptrace", "target_pid": 99, "mode": 0x12}, "TAMPER ptrace -> pid 99"),
])
def test_tamper_record_decodes(what, target, arg, fields, text):
    ev = abi.TamperEvent(what=int(what), target=target, arg=arg)
    ev.hdr.type = int(abi.EventType.TAMPER_BLOCKED)
    d = events.Decoder()
    d.enforcer = "lsm"
    out = d.decode(bytes(ev))
    assert out["type"] == "tamper_blocked" and out["enforcer"] == "lsm"
    assert {k: out[k] for k in fields} == fields
    assert text in events.to_text(out)
