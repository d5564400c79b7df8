"""A small reader of the .BTF section of a BPF ELF object: structs, members and enums by name."""
from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

import attrs

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
# Bytes of extra data after each btf_type, per kind: (fixed, per vlen item)
_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0),
          15: (0, 12), 17: (4, 0), 19: (0, 12)}


@attrs.frozen
class Member:
    name: str
    offset: int      # bytes
    size: int        # bytes


@attrs.frozen
class BtfType:
    kind: int
    name: str
    size_or_type: int
    vlen: int
    extra: bytes


class Btf:
    def __init__(self, data: bytes):
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data)
        if magic != 0xEB9F:
            raise ValueError("not BTF (bad magic)")
        strs = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: List[Optional[BtfType]] = [None]  # ids start at 1
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, sot = struct.unpack_from("<III", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            fixed, per = _EXTRA.get(kind, (0, 0))
            extra_len = fixed + per * vlen
            name = strs[name_off:strs.index(b"\0", name_off)].decode()
            self.types.append(BtfType(kind, name, sot, vlen, data[pos + 12:pos + 12 + extra_len]))
            pos += 12 + extra_len
        self._strs = strs

    def _str(self, off: int) -> str:
        return self._strs[off:self._strs.index(b"\0", off)].decode()

    def find(self, kind: int, name: str) -> Tuple[int, BtfType]:
        for i, t in enumerate(self.types):
            if t is not None and t.kind == kind and t.name == name:
                return i, t
        raise KeyError(f"no BTF kind {kind} named {name}")

    def size_of(self, type_id: int) -> int:
        t = self.types[type_id]
        if t.kind in (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT):
            return self.size_of(t.size_or_type)
        if t.kind == KIND_ARRAY:
            elem, _idx, n = struct.unpack_from("<III", t.extra)
            return self.size_of(elem) * n
        if t.kind == KIND_PTR:
            return 8
        return t.size_or_type

    def struct(self, name: str) -> Tuple[int, List[Member]]:
        """(size, members) of a struct."""
        _, t = self.find(KIND_STRUCT, name)
        members = []
        for i in range(t.vlen):
            name_off, type_id, bit_off = struct.unpack_from("<III", t.extra, i * 12)
            members.append(Member(self._str(name_off), bit_off // 8, self.size_of(type_id)))
        return t.size_or_type, members

    def enum(self, name: str) -> Dict[str, int]:
        _, t = self.find(KIND_ENUM, name)
        return {self._str(struct.unpack_from("<I", t.extra, i * 8)[0]): struct.unpack_from("<i", t.extra, i * 8 + 4)[0]
                for i in range(t.vlen)}


def from_elf(path: str) -> Btf:
    """Reads the .BTF section of a 64-bit little-endian ELF file."""
    with open(path, "rb") as f:
        elf = f.read()
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    for sh in sections:
        name = elf[names_off + sh[0]:elf.index(b"\0", names_off + sh[0])]
        if name == b".BTF":
            return Btf(elf[sh[4]:sh[4] + sh[5]])
    raise ValueError(f"{path}: no .BTF section")
