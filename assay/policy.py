"""Policy loader: strict validation of Assay YAML policies (Rust Assay `runtime_monitor` shape)
into small frozen objects, with every error reported as FILE:LINE:COL."""
from __future__ import annotations

import difflib
import hashlib
import io
import ipaddress
import json
import os
import re
import socket
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from assay.errors import AssayError, InputError

__all__ = [
    "ACTIONS", "DEFAULT_ACTION", "DEFAULT_SEVERITY", "KILL_MODES", "RULE_TYPES", "SEVERITIES", "VERSIONS",
    "Dest", "KillSwitch", "PathGlob", "Policy", "PolicyReadError", "Rule",
    "dump_policy", "load_policy", "parse_dest", "parse_path_glob", "parse_policy", "policy_digest",
    "resolve_hosts",
]

VERSIONS = ("1.0", "2.0")
RULE_TYPES = ("file_open", "net_connect", "proc_exec")
SEVERITIES = ("low", "medium", "high", "critical")
ACTIONS = ("log", "alert", "deny", "trigger_kill")
KILL_MODES = ("graceful", "immediate")
DEFAULT_SEVERITY = "medium"
# A rule without an action only reports: blocking must be asked for explicitly, so a typo'd or
# forgotten action never starts denying a CI workload's opens.
DEFAULT_ACTION = "alert"
DEFAULT_KILL_MODE = "graceful"
DEFAULT_GRACE_MS = 3000
MAX_GRACE_MS = 3_600_000          # one hour; anything longer is almost surely seconds mistaken for ms
MAX_RULE_ID = 64
PATH_MAX = 4096                   # Linux PATH_MAX, bytes including the NUL
NAME_MAX = 255                    # Linux NAME_MAX, bytes per component

_TOP_KEYS = ("version", "name", "runtime_monitor", "kill_switch")
_RM_KEYS = ("enabled", "rules")
_RULE_KEYS = ("id", "type", "match", "severity", "action", "allow_missing")
_KS_KEYS = ("enabled", "mode", "grace_period_ms", "triggers")
_TRIGGER_KEYS = ("on_rule",)
_RULE_ID_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
_GLOB_CHARS = "*?[]{}"

PATH_FORMS = "an exact absolute path (/a/b/c) or a whole subtree (/dir/**)"
DEST_FORMS = ("an IP address or CIDR (10.0.0.0/8, ::1, fd00::/8), a port or port range (22, 8000-8999), "
              "ADDR:PORT or [V6]:PORT (10.1.2.3:443, [::1]:8080), or a host name (example.com, example.com:443, "
              "*.example.com:443)")

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


# ---------------------------------------------------------------------------------------------
# The parsed policy. Source positions (1-based) are kept on items but excluded from equality and
# from the digest: moving a rule down a line does not change what the policy means.

def _pos_field() -> Any:
    return attrs.field(default=0, eq=False)


@attrs.frozen
class PathGlob:
    """`path` is normalised and absolute; `subtree` means everything below `path` (`/dir/**`),
    not `path` itself."""

    path: str
    subtree: bool = False
    line: int = _pos_field()
    col: int = _pos_field()

    def __str__(self) -> str:
        if not self.subtree:
            return self.path
        return "/**" if self.path == "/" else self.path + "/**"

    def covers(self, other: "PathGlob") -> bool:
        """Lexically: is everything `other` names also named by this glob?"""
        if (other.path, other.subtree) == (self.path, self.subtree):
            return True
        return self.subtree and is_below(other.path, self.path)


@attrs.frozen
class Dest:
    """One `dest_globs` item. `network` None means any address; ports 0-65535 means any port.
    A host name is kept in `host`; after resolve_hosts() there is one Dest per address, with
    `network` set and `host` still naming where it came from."""

    network: Optional[IPNetwork] = None
    port_lo: int = 0
    port_hi: int = 65535
    host: Optional[str] = None
    line: int = _pos_field()
    col: int = _pos_field()

    @property
    def any_port(self) -> bool:
        return self.port_lo == 0 and self.port_hi == 65535

    @property
    def unresolved(self) -> bool:
        return self.host is not None and self.network is None

    @property
    def wildcard(self) -> bool:
        """`*.SUFFIX`: only the DNS proxy can follow it (no load-time resolution)."""
        return self.host is not None and self.host.startswith("*.")

    def __str__(self) -> str:
        """The canonical dest_globs spelling (a resolved host prints as its name)."""
        ports = str(self.port_lo) if self.port_lo == self.port_hi else f"{self.port_lo}-{self.port_hi}"
        if self.host is not None:
            return self.host if self.any_port else f"{self.host}:{ports}"
        if self.network is None:
            return ports
        net = self.network
        addr = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        if self.any_port:
            return addr
        return f"[{addr}]:{ports}" if net.version == 6 else f"{addr}:{ports}"


@attrs.frozen
class Rule:
    id: str
    type: str
    severity: str = DEFAULT_SEVERITY
    action: str = DEFAULT_ACTION
    paths: Tuple[PathGlob, ...] = ()
    not_paths: Tuple[PathGlob, ...] = ()
    dests: Tuple[Dest, ...] = ()
    not_dests: Tuple[Dest, ...] = ()
    allow_missing: bool = False
    line: int = _pos_field()
    col: int = _pos_field()

    @property
    def blocks(self) -> bool:
        """Does a match make the operation fail (EPERM), rather than only be reported?"""
        return self.action in ("deny", "trigger_kill")


@attrs.frozen
class KillSwitch:
    enabled: bool = False
    mode: str = DEFAULT_KILL_MODE
    grace_period_ms: int = DEFAULT_GRACE_MS
    triggers: Tuple[str, ...] = ()          # rule ids named by `triggers: [{on_rule: ID}]`


@attrs.frozen
class Policy:
    path: str = attrs.field(eq=False)
    version: str
    name: str
    enabled: bool
    rules: Tuple[Rule, ...]
    kill_switch: KillSwitch = KillSwitch()

    def rule(self, rule_id: str) -> Rule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    def kill_rule_ids(self) -> frozenset:
        """Rules whose hit kills the process: action trigger_kill, or named by an enabled kill_switch."""
        if not self.kill_switch.enabled:
            return frozenset()
        return frozenset(r.id for r in self.rules if r.action == "trigger_kill") | frozenset(
            self.kill_switch.triggers)

    def resolved_hosts(self) -> Dict[str, Tuple[str, ...]]:
        """host name -> the addresses it resolved to (after resolve_hosts), for display."""
        out: Dict[str, List[str]] = {}
        for r in self.rules:
            for d in r.dests + r.not_dests:
                if d.host is not None and d.network is not None:
                    addrs = out.setdefault(d.host, [])
                    a = str(d.network.network_address)
                    if a not in addrs:
                        addrs.append(a)
        return {h: tuple(a) for h, a in out.items()}

    def name_dests(self) -> Tuple[Dest, ...]:
        """The host-name items still unresolved (what the DNS proxy follows at run time)."""
        return tuple(d for r in self.rules if r.type == "net_connect" for d in r.dests + r.not_dests
                     if d.unresolved)

    def error_at(self, item: Union[Rule, PathGlob, Dest], message: str) -> InputError:
        """An InputError at an item's source position, for errors found after parsing
        (a denied path missing at start, an inode that cannot be opened...)."""
        return InputError(self.path, item.line, item.col, message)


class PolicyReadError(InputError):
    """The policy file cannot be read at all: there is no line or column to point at."""

    def __init__(self, path: str, reason: str):
        self.path, self.line, self.col = path, 0, 0
        AssayError.__init__(self, f"{path}: cannot read: {reason}")


# ---------------------------------------------------------------------------------------------
# Item grammars. Both raise ValueError(message); the caller adds the rule name and position.

def parse_path_glob(text: str) -> Tuple[str, bool]:
    """`/a/b/c` -> ("/a/b/c", False); `/dir/**` -> ("/dir", True). Only these two forms can be
    enforced by inode identity in the kernel; anything else is refused, never approximated."""
    if text == "":
        raise ValueError(f"empty path; use {PATH_FORMS}")
    if "\0" in text:
        raise ValueError("path contains a NUL character, which no file name can contain")
    if not text.startswith("/"):
        hint = " ('~' is not expanded)" if text.startswith("~") else ""
        raise ValueError(f"path '{text}' is relative{hint}; paths must be absolute: {PATH_FORMS}")
    subtree = text.endswith("/**")
    body = text[:-3] if subtree else text
    if any(c in body for c in _GLOB_CHARS):
        raise ValueError(_unenforceable(text, body))
    if body.endswith("/") and body.strip("/"):
        raise ValueError(f"path '{text}' ends with '/'; write '{body.rstrip('/')}' for the directory "
                         f"itself or '{body.rstrip('/')}/**' for everything below it")
    parts = [p for p in body.split("/") if p]         # collapses '//' (same file, harmless)
    for p in parts:
        if p in (".", ".."):
            # '..' after a symlink means something else to the kernel than to a string edit, so
            # the loader neither resolves nor guesses: the user writes the real path.
            raise ValueError(f"path '{text}' contains a '{p}' component, which the loader does not "
                             f"resolve (after a symlink '..' names another directory than the text "
                             f"suggests); write the real path without '.' or '..' components")
    path = "/" + "/".join(parts)
    try:
        raw = os.fsencode(path)
    except UnicodeError:
        raise ValueError(f"path '{text}' cannot be encoded as a file name") from None
    if len(raw) >= PATH_MAX:
        raise ValueError(f"path is {len(raw)} bytes long; the limit is {PATH_MAX - 1} (PATH_MAX)")
    for p in parts:
        if len(os.fsencode(p)) > NAME_MAX:
            raise ValueError(f"path component '{p[:20]}...' is longer than {NAME_MAX} bytes (NAME_MAX)")
    return path, subtree


def _unenforceable(text: str, body: str) -> str:
    parts = body.split("/")
    first = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))
    prefix = "/".join(parts[:first]) or ""
    if "**" in parts[first]:
        why = "'**' is only allowed as the whole last component (/dir/**)"
    elif "*" in parts[first] or "?" in parts[first]:
        why = "wildcards inside a name ('*', '?') would need path-string matching"
    else:
        why = "patterns ('[...]', '{...}') would need path-string matching"
    fix = f"use '{prefix}/**' to cover everything below {prefix}, or list the files" if prefix else "list the files"
    return (f"glob '{text}' cannot be enforced in the kernel: it matches files by inode identity, "
            f"and {why}; allowed forms are {PATH_FORMS}: {fix} one by one")


_PORTISH = re.compile(r"[0-9]+(?:-[0-9]+)?\Z")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


def parse_dest(text: str) -> Tuple[Optional[IPNetwork], int, int, Optional[str]]:
    """One dest_globs string -> (network or None, port_lo, port_hi, host or None)."""
    if text == "":
        raise ValueError(f"empty destination; allowed: {DEST_FORMS}")
    if any(c.isspace() for c in text):
        raise ValueError(f"destination '{text}' contains whitespace; allowed: {DEST_FORMS}")
    if text.startswith("["):
        m = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text)
        if not m or m.group(2) is None:
            raise ValueError(f"malformed '{text}': brackets are only for [V6]:PORT, e.g. [::1]:8080 or "
                             f"[fd00::/8]:443; write a v6 address without a port as ::1")
        net = _parse_net(m.group(1), text)
        if net is None or (net.version != 6 and not m.group(1).lower().startswith("::ffff:")):
            raise ValueError(f"malformed '{text}': [V6]:PORT needs an IPv6 address or CIDR inside the "
                             f"brackets; write IPv4 as ADDR:PORT (10.1.2.3:443)")
        lo, hi = _parse_ports(m.group(2), text)
        return net, lo, hi, None
    if re.fullmatch(r"[0-9-]+", text):
        lo, hi = _parse_ports(text, text)
        return None, lo, hi, None
    if text.count(":") >= 2:
        net = _parse_net(text, text)
        if net is None:
            raise ValueError(f"'{text}' is not a valid IPv6 address or CIDR; with a port write [V6]:PORT "
                             f"([::1]:8080); allowed: {DEST_FORMS}")
        return net, 0, 65535, None
    lo, hi = 0, 65535
    addr = text
    if ":" in text:
        addr, port = text.rsplit(":", 1)
        lo, hi = _parse_ports(port, text)
        if addr == "":
            raise ValueError(f"'{text}' has a port but no address; write a bare port (22) or ADDR:PORT")
    net = _parse_net(addr, text)
    if net is not None:
        return net, lo, hi, None
    return None, lo, hi, _parse_host(addr, text)


def _parse_ports(spec: str, text: str) -> Tuple[int, int]:
    if not _PORTISH.match(spec):
        raise ValueError(f"bad port '{spec}'{_in(spec, text)}; a port is 0..65535, a range is LO-HI (8000-8999)")
    nums = spec.split("-")
    # length check first: int() of a huge digit string is slow or refused outright
    if any(len(n) > 5 or int(n) > 65535 for n in nums):
        raise ValueError(f"port '{spec}'{_in(spec, text)} is out of range; ports are 0..65535")
    lo, hi = int(nums[0]), int(nums[-1])
    if lo > hi:
        raise ValueError(f"port range '{spec}'{_in(spec, text)} is backwards; write LO-HI with LO <= HI ({hi}-{lo})")
    return lo, hi


def _in(part: str, text: str) -> str:
    return "" if part == text else f" in '{text}'"


def _parse_net(addr: str, text: str) -> Optional[IPNetwork]:
    """An address or CIDR, or None when `addr` is not IP-shaped (then it may be a host name)."""
    if "%" in addr:
        raise ValueError(f"'{text}': IPv6 zone ids ('%eth0') cannot be matched in the kernel; "
                         f"write the address without the zone")
    if "/" in addr:
        try:
            net = ipaddress.ip_network(addr, strict=True)
        except ValueError as e:
            if "host bits set" in str(e):
                fixed = ipaddress.ip_network(addr, strict=False)
                raise ValueError(f"bad CIDR '{addr}': it has host bits set; the network is {fixed}") from None
            raise ValueError(f"bad CIDR '{addr}'{_in(addr, text)}: expected ADDRESS/PREFIX with a prefix of "
                             f"0..32 for IPv4 or 0..128 for IPv6 (10.0.0.0/8, fd00::/8)") from None
        return _unmap(net)
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        if re.fullmatch(r"[0-9.]+", addr):
            raise ValueError(f"bad IPv4 address '{addr}'{_in(addr, text)}: expected four numbers 0..255, "
                             f"e.g. 10.1.2.3") from None
        if ":" in addr:
            return None
        return None
    return _unmap(ipaddress.ip_network(ip))


def _unmap(net: IPNetwork) -> IPNetwork:
    # ::ffff:a.b.c.d is how an AF_INET6 socket reaches an IPv4 peer; the kernel matches it against
    # the IPv4 rules, so the policy stores it as IPv4 too (one spelling, one map entry).
    if net.version == 6 and net.subnet_of(_MAPPED_V4):  # type: ignore[arg-type]
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def _parse_host(name: str, text: str) -> str:
    """A fully qualified name, lower-cased; or `*.SUFFIX`, which matches
    one or more labels below SUFFIX (never SUFFIX itself). Names are followed through the DNS
    proxy at run time (assay/dns/, docs/egress.md)."""
    host = name.lower()          # kept as written (a trailing dot too); matching ignores the dot
    wildcard = host.startswith("*.")
    body = host[2:] if wildcard else host
    body = body[:-1] if body.endswith(".") else body
    if "*" in body or "?" in body:
        raise ValueError(f"wildcard host '{name}' is not valid: a wildcard is only allowed as the whole "
                         f"first label (*.example.com), and it matches one or more labels below the suffix")
    labels = body.split(".")
    if (len(body) > 253 or not all(_LABEL.match(l) for l in labels)
            or labels[-1].isdigit()):
        raise ValueError(f"'{text}' is not a valid destination; allowed: {DEST_FORMS}")
    if wildcard and len(labels) < 2:
        raise ValueError(f"wildcard host '{name}' is too wide: the suffix must have at least two labels "
                         f"(*.example.com, not *.com)")
    return host


def is_below(path: str, parent: str) -> bool:
    if parent == "/":
        return path != "/"
    return path.startswith(parent + "/")


# ---------------------------------------------------------------------------------------------
# YAML walking with positions.

Pos = Tuple[int, int]        # 1-based (line, col)


def _node_pos(node: Any) -> Pos:
    lc = getattr(node, "lc", None)
    if lc is None or lc.line is None:
        return (1, 1)
    return (lc.line + 1, lc.col + 1)


def _key_pos(m: CommentedMap, key: Any) -> Pos:
    try:
        line, col = m.lc.key(key)
        return (line + 1, col + 1)
    except (KeyError, TypeError):    # a key brought in by a '<<' merge has no position of its own
        return _node_pos(m)


def _value_pos(m: CommentedMap, key: Any) -> Pos:
    try:
        line, col = m.lc.value(key)
        return (line + 1, col + 1)
    except (KeyError, TypeError):
        return _node_pos(m)


def _item_pos(s: CommentedSeq, i: int) -> Pos:
    try:
        line, col = s.lc.item(i)
        return (line + 1, col + 1)
    except (KeyError, TypeError):
        return _node_pos(s)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"integer {int(v)}"
    if isinstance(v, float):
        return f"number {v}"
    if isinstance(v, str):
        return f"string '{v}'"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    return type(v).__name__


def _suggest(word: Any, allowed: Sequence[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word.lower(), allowed, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _list(items: Iterable[str]) -> str:
    return ", ".join(items)


@attrs.frozen
class _Ctx:
    path: str

    def err(self, pos: Pos, message: str) -> InputError:
        return InputError(self.path, pos[0], pos[1], message)

    def keys(self, m: CommentedMap, allowed: Sequence[str], where: str) -> None:
        for k in m:
            if k not in allowed:
                raise self.err(_key_pos(m, k), f"unknown key {_show_key(k)} in {where}{_suggest(k, allowed)}; "
                                               f"allowed keys: {_list(allowed)}")

    def mapping(self, v: Any, pos: Pos, what: str) -> CommentedMap:
        if not isinstance(v, CommentedMap):
            raise self.err(pos, f"{what} must be a mapping (key: value lines), got {_kind(v)}")
        return v

    def seq(self, v: Any, pos: Pos, what: str) -> CommentedSeq:
        if not isinstance(v, CommentedSeq):
            raise self.err(pos, f"{what} must be a list, got {_kind(v)}")
        return v

    def string(self, v: Any, pos: Pos, what: str) -> str:
        if not isinstance(v, str):
            raise self.err(pos, f"{what} must be a string, got {_kind(v)}")
        return str(v)

    def boolean(self, v: Any, pos: Pos, what: str) -> bool:
        if not isinstance(v, bool):
            raise self.err(pos, f"{what} must be true or false, got {_kind(v)}")
        return bool(v)

    def enum(self, v: Any, pos: Pos, what: str, allowed: Sequence[str]) -> str:
        if not isinstance(v, str) or v not in allowed:
            shown = f"'{v}'" if isinstance(v, str) else _kind(v)
            raise self.err(pos, f"{what} {shown} is not valid{_suggest(v, allowed)}; allowed: {_list(allowed)}")
        return str(v)

    def required(self, m: CommentedMap, key: str, where: str, required: Sequence[str]) -> Any:
        if key not in m:
            raise self.err(_node_pos(m), f"missing required key '{key}' in {where}; "
                                         f"required keys: {_list(required)}")
        return m[key]


def _show_key(k: Any) -> str:
    return f"'{k}'" if isinstance(k, str) else repr(k)


def _load_yaml(text: str, path: str) -> Any:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        return yaml.load(text)
    except DuplicateKeyError as e:
        m = re.search(r'duplicate key "(.*?)"', str(e.problem))
        key = f"'{m.group(1)}'" if m else "key"
        first = e.context_mark
        where = f" (in the mapping at {first.line + 1}:{first.column + 1})" if first else ""
        raise _yaml_err(path, e.problem_mark, f"duplicate key {key}{where}; each key may appear only once")
    except MarkedYAMLError as e:
        context = f" {e.context}" if e.context else ""
        if e.context and e.context_mark is not None and e.problem_mark is not None:
            context += f" at {e.context_mark.line + 1}:{e.context_mark.column + 1}"
        mark = e.problem_mark or e.context_mark
        raise _yaml_err(path, mark, f"YAML syntax error: {e.problem}{(';' + context) if context else ''}")
    except YAMLError as e:
        # e.g. a ReaderError for a control character; it carries a character offset, not a mark
        pos = getattr(e, "position", None)
        line, col = _offset_pos(text, pos) if isinstance(pos, int) else (1, 1)
        char = getattr(e, "character", None)
        what = f"character {char!r} is not allowed in YAML" if isinstance(char, str) else str(e).split("\n")[0]
        raise InputError(path, line, col, f"YAML error: {what}; remove it or write it as an escape "
                                          f"in a double-quoted string")
    except RecursionError:
        raise InputError(path, 1, 1, "YAML nesting is too deep; a policy needs only a few levels")


def _yaml_err(path: str, mark: Any, message: str) -> InputError:
    if mark is None:
        return InputError(path, 1, 1, message)
    return InputError(path, mark.line + 1, mark.column + 1, message)


def _offset_pos(text: str, offset: int) -> Pos:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


# ---------------------------------------------------------------------------------------------
# The schema.

def load_policy(path: Union[str, os.PathLike]) -> Policy:
    """Read and validate a policy file. Raises InputError (exit code 1) on anything wrong."""
    name = os.fspath(path)
    name = name if isinstance(name, str) else os.fsdecode(name)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PolicyReadError(name, e.strerror or str(e)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(name, line, col, "the file is not valid UTF-8 text; policies must be UTF-8") from None
    return parse_policy(text, name)


def parse_policy(text: str, path: str = "<string>") -> Policy:
    """Validate policy YAML text. `path` only names the source in error messages."""
    ctx = _Ctx(path)
    doc = _load_yaml(text, path)
    if doc is None:
        raise ctx.err((1, 1), "the policy is empty; expected a mapping with keys version, name, "
                              "runtime_monitor (and optionally kill_switch)")
    top = ctx.mapping(doc, _node_pos(doc), "the policy")
    ctx.keys(top, _TOP_KEYS, "the policy")
    required = ("version", "name", "runtime_monitor")
    version = ctx.required(top, "version", "the policy", required)
    vpos = _value_pos(top, "version")
    if isinstance(version, (int, float)) and not isinstance(version, bool):
        raise ctx.err(vpos, f"version must be a quoted string, \"1.0\" or \"2.0\"; an unquoted {version} "
                            f"is a YAML number (write version: \"2.0\")")
    version = ctx.enum(version, vpos, "version", VERSIONS)
    name = ctx.string(ctx.required(top, "name", "the policy", required), _value_pos(top, "name"), "name")
    rm = ctx.mapping(ctx.required(top, "runtime_monitor", "the policy", required),
                     _value_pos(top, "runtime_monitor"), "runtime_monitor")
    ctx.keys(rm, _RM_KEYS, "runtime_monitor")
    enabled = True
    if "enabled" in rm:
        enabled = ctx.boolean(rm["enabled"], _value_pos(rm, "enabled"), "runtime_monitor.enabled")
    rules_node = ctx.seq(ctx.required(rm, "rules", "runtime_monitor", ("rules",)),
                         _value_pos(rm, "rules"), "runtime_monitor.rules")
    if len(rules_node) == 0:
        raise ctx.err(_value_pos(rm, "rules"), "runtime_monitor.rules is empty; a policy needs at least "
                                               "one rule (file_open, net_connect or proc_exec)")
    rules: List[Rule] = []
    seen: Dict[str, Pos] = {}
    action_pos: Dict[str, Pos] = {}
    for i, node in enumerate(rules_node):
        rule, id_pos, apos = _parse_rule(ctx, node, _item_pos(rules_node, i), i)
        if rule.id in seen:
            first = seen[rule.id]
            raise ctx.err(id_pos, f"duplicate rule id '{rule.id}' (first used at {first[0]}:{first[1]}); "
                                  f"rule ids must be unique")
        seen[rule.id] = id_pos
        action_pos[rule.id] = apos
        rules.append(rule)
    kill = KillSwitch()
    if "kill_switch" in top:
        kill = _parse_kill_switch(ctx, top["kill_switch"], _value_pos(top, "kill_switch"), seen)
    for rule in rules:
        if rule.action == "trigger_kill" and not kill.enabled:
            raise ctx.err(action_pos[rule.id], f"rule '{rule.id}' has action trigger_kill but kill_switch is "
                                               f"not enabled; add kill_switch: {{enabled: true, mode: graceful|"
                                               f"immediate}}, or use action deny")
    return Policy(path=path, version=version, name=name, enabled=enabled, rules=tuple(rules), kill_switch=kill)


def _parse_rule(ctx: _Ctx, node: Any, pos: Pos, index: int) -> Tuple[Rule, Pos, Pos]:
    m = ctx.mapping(node, pos, f"rule #{index + 1}")
    rid = m.get("id") if "id" in m else None
    label = f"rule '{rid}'" if isinstance(rid, str) and _RULE_ID_RE.match(rid) else f"rule #{index + 1}"
    ctx.keys(m, _RULE_KEYS, label)
    required = ("id", "type", "match")
    id_pos = _value_pos(m, "id")
    rid = ctx.string(ctx.required(m, "id", label, required), id_pos, f"{label}: id")
    if not _RULE_ID_RE.match(rid) or len(rid) > MAX_RULE_ID:
        raise ctx.err(id_pos, f"rule id '{rid}' is not valid; ids are 1..{MAX_RULE_ID} characters from "
                              f"A-Z a-z 0-9 _ . -")
    rtype = ctx.enum(ctx.required(m, "type", label, required), _value_pos(m, "type"), f"{label}: type", RULE_TYPES)
    severity = DEFAULT_SEVERITY
    if "severity" in m:
        severity = ctx.enum(m["severity"], _value_pos(m, "severity"), f"{label}: severity", SEVERITIES)
    action = DEFAULT_ACTION
    if "action" in m:
        action = ctx.enum(m["action"], _value_pos(m, "action"), f"{label}: action", ACTIONS)
    allow_missing = False
    if "allow_missing" in m:
        if rtype == "net_connect":
            raise ctx.err(_key_pos(m, "allow_missing"),
                          f"{label}: allow_missing applies only to file_open and proc_exec rules (whose paths "
                          f"may be missing at start); net_connect rules have no paths")
        allow_missing = ctx.boolean(m["allow_missing"], _value_pos(m, "allow_missing"), f"{label}: allow_missing")
    match = ctx.mapping(ctx.required(m, "match", label, required), _value_pos(m, "match"), f"{label}: match")
    key = "dest_globs" if rtype == "net_connect" else "path_globs"
    items = _parse_match(ctx, match, label, rtype, key, top=True)
    excluded: Tuple[Any, ...] = ()
    if "not" in match:
        not_m = ctx.mapping(match["not"], _value_pos(match, "not"), f"{label}: match.not")
        excluded = _parse_match(ctx, not_m, label, rtype, key, top=False)
    rule = Rule(id=rid, type=rtype, severity=severity, action=action, allow_missing=allow_missing,
                line=pos[0], col=pos[1])
    if key == "path_globs":
        for g in excluded:
            if not any(p.covers(g) for p in items):
                raise ctx.err((g.line, g.col), f"{label}: not.path_globs entry '{g}' is not inside any of the "
                                               f"rule's path_globs ({_list(str(p) for p in items)}), so it "
                                               f"excepts nothing; an exception must name a path the rule covers")
        rule = attrs.evolve(rule, paths=items, not_paths=excluded)
    else:
        rule = attrs.evolve(rule, dests=items, not_dests=excluded)
    return rule, id_pos, _value_pos(m, "action")


def _parse_match(ctx: _Ctx, m: CommentedMap, label: str, rtype: str, key: str, top: bool) -> Tuple[Any, ...]:
    where = f"{label}: match" if top else f"{label}: match.not"
    allowed = (key, "not") if top else (key,)
    other = "path_globs" if key == "dest_globs" else "dest_globs"
    for k in m:
        if k == other:
            kinds = "file_open and proc_exec" if other == "path_globs" else "net_connect"
            raise ctx.err(_key_pos(m, k), f"{where}: {other} is for {kinds} rules; a {rtype} rule matches "
                                          f"{key}")
    ctx.keys(m, allowed, where)
    if key not in m:
        if top:
            raise ctx.err(_node_pos(m), f"missing required key '{key}' in {where}; a {rtype} rule "
                                        f"matches {key}")
        return ()
    seq = ctx.seq(m[key], _value_pos(m, key), f"{where}.{key}")
    if top and len(seq) == 0:
        raise ctx.err(_value_pos(m, key), f"{where}.{key} is empty; list at least one "
                                          f"{'path' if key == 'path_globs' else 'destination'}")
    out: List[Any] = []
    first: Dict[Any, Pos] = {}
    for i, v in enumerate(seq):
        pos = _item_pos(seq, i)
        item = _path_item(ctx, v, pos, label) if key == "path_globs" else _dest_item(ctx, v, pos, label)
        if item in first:
            f = first[item]
            raise ctx.err(pos, f"{where}.{key} lists '{item}' twice (first at {f[0]}:{f[1]}); list each "
                               f"entry once")
        first[item] = pos
        out.append(item)
    return tuple(out)


def _path_item(ctx: _Ctx, v: Any, pos: Pos, label: str) -> PathGlob:
    text = ctx.string(v, pos, f"{label}: a path_globs entry")
    try:
        path, subtree = parse_path_glob(text)
    except ValueError as e:
        raise ctx.err(pos, f"{label}: {e}") from None
    return PathGlob(path=path, subtree=subtree, line=pos[0], col=pos[1])


def _dest_item(ctx: _Ctx, v: Any, pos: Pos, label: str) -> Dest:
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(int(v))        # an unquoted `22` is a YAML integer; it still means the port
    text = ctx.string(v, pos, f"{label}: a dest_globs entry")
    try:
        net, lo, hi, host = parse_dest(text)
    except ValueError as e:
        raise ctx.err(pos, f"{label}: {e}") from None
    return Dest(network=net, port_lo=lo, port_hi=hi, host=host, line=pos[0], col=pos[1])


def _parse_kill_switch(ctx: _Ctx, node: Any, pos: Pos, rule_ids: Dict[str, Pos]) -> KillSwitch:
    m = ctx.mapping(node, pos, "kill_switch")
    ctx.keys(m, _KS_KEYS, "kill_switch")
    enabled = ctx.boolean(ctx.required(m, "enabled", "kill_switch", ("enabled",)),
                          _value_pos(m, "enabled"), "kill_switch.enabled")
    mode = DEFAULT_KILL_MODE
    if "mode" in m:
        mode = ctx.enum(m["mode"], _value_pos(m, "mode"), "kill_switch.mode", KILL_MODES)
    grace = DEFAULT_GRACE_MS
    if "grace_period_ms" in m:
        v, gpos = m["grace_period_ms"], _value_pos(m, "grace_period_ms")
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_GRACE_MS:
            raise ctx.err(gpos, f"kill_switch.grace_period_ms must be an integer number of milliseconds, "
                                f"0..{MAX_GRACE_MS}, got {_kind(v)}")
        grace = int(v)
    triggers: List[str] = []
    if "triggers" in m:
        seq = ctx.seq(m["triggers"], _value_pos(m, "triggers"), "kill_switch.triggers")
        for i, t in enumerate(seq):
            tm = ctx.mapping(t, _item_pos(seq, i), f"kill_switch.triggers entry #{i + 1}")
            ctx.keys(tm, _TRIGGER_KEYS, "a kill_switch trigger")
            rid = ctx.string(ctx.required(tm, "on_rule", "a kill_switch trigger", _TRIGGER_KEYS),
                             _value_pos(tm, "on_rule"), "kill_switch trigger on_rule")
            tpos = _value_pos(tm, "on_rule")
            if rid not in rule_ids:
                known = sorted(rule_ids)
                shown = _list(known[:10]) + (", ..." if len(known) > 10 else "")
                raise ctx.err(tpos, f"kill_switch trigger names unknown rule '{rid}'{_suggest(rid, known)}; "
                                    f"on_rule must be the id of a rule in runtime_monitor.rules: {shown}")
            if rid in triggers:
                raise ctx.err(tpos, f"kill_switch triggers name rule '{rid}' twice; name each rule once")
            triggers.append(rid)
    return KillSwitch(enabled=enabled, mode=mode, grace_period_ms=grace, triggers=tuple(triggers))


# ---------------------------------------------------------------------------------------------
# Host names, digest, dump.

Resolver = Callable[..., Sequence[Tuple[Any, ...]]]


def resolve_hosts(policy: Policy, resolver: Resolver = socket.getaddrinfo) -> Policy:
    """A new policy in which each host-name Dest becomes one Dest per address the name resolves to
    (`host` kept, for display). Each name is resolved once. Unresolvable -> InputError at the item.
    Wildcards (`*.SUFFIX`) stay unresolved: only the DNS proxy can follow them."""
    cache: Dict[str, Tuple[IPNetwork, ...]] = {}

    def addresses(d: Dest) -> Tuple[IPNetwork, ...]:
        assert d.host is not None
        if d.host not in cache:
            try:
                infos = resolver(d.host, None, 0, socket.SOCK_STREAM)
            except (OSError, UnicodeError) as e:
                reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
                raise policy.error_at(d, f"host name '{d.host}' does not resolve ({reason}); fix the name or "
                                         f"use an IP address or CIDR") from None
            nets = set()
            for info in infos:
                if info[0] not in (socket.AF_INET, socket.AF_INET6):
                    continue
                addr = str(info[4][0]).split("%", 1)[0]
                nets.add(_unmap(ipaddress.ip_network(addr)))
            if not nets:
                raise policy.error_at(d, f"host name '{d.host}' resolved to no IPv4 or IPv6 address; fix the "
                                         f"name or use an IP address or CIDR")
            cache[d.host] = tuple(sorted(nets, key=lambda n: (n.version, int(n.network_address))))
        return cache[d.host]

    def expand(dests: Tuple[Dest, ...]) -> Tuple[Dest, ...]:
        out: List[Dest] = []
        for d in dests:
            if d.unresolved and not d.wildcard:
                out.extend(attrs.evolve(d, network=n) for n in addresses(d))
            else:
                out.append(d)
        return tuple(out)

    rules = tuple(attrs.evolve(r, dests=expand(r.dests), not_dests=expand(r.not_dests))
                  if r.type == "net_connect" else r for r in policy.rules)
    return attrs.evolve(policy, rules=rules)


def _canonical(policy: Policy) -> Dict[str, Any]:
    def dest(d: Dest) -> Dict[str, Any]:
        return {"network": None if d.network is None else str(d.network), "ports": [d.port_lo, d.port_hi],
                "host": d.host}

    ks = policy.kill_switch
    return {
        "schema": "assay-policy/1",     # bump if this canonical form changes, so digests change on purpose
        "version": policy.version, "name": policy.name, "enabled": policy.enabled,
        "rules": [{"id": r.id, "type": r.type, "severity": r.severity, "action": r.action,
                   "allow_missing": r.allow_missing,
                   "paths": [str(p) for p in r.paths], "not_paths": [str(p) for p in r.not_paths],
                   "dests": [dest(d) for d in r.dests], "not_dests": [dest(d) for d in r.not_dests]}
                  for r in policy.rules],
        "kill_switch": {"enabled": ks.enabled, "mode": ks.mode, "grace_period_ms": ks.grace_period_ms,
                        "triggers": list(ks.triggers)},
    }


def policy_digest(policy: Policy) -> str:
    """sha256 hex of a canonical JSON of what the policy means: no source path or positions,
    and, after resolve_hosts(), the addresses the names resolved to."""
    blob = json.dumps(_canonical(policy), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def dump_policy(policy: Policy) -> str:
    """The policy as YAML in the same schema; parse_policy(dump_policy(p)) == p for an unresolved
    policy. A resolved host is written back as its name (once), not as its addresses."""
    rules = CommentedSeq()
    for r in policy.rules:
        match = CommentedMap()
        if r.type == "net_connect":
            key, items, excluded = "dest_globs", _dest_texts(r.dests), _dest_texts(r.not_dests)
        else:
            key, items, excluded = "path_globs", [str(p) for p in r.paths], [str(p) for p in r.not_paths]
        match[key] = CommentedSeq(_scalar(t) for t in items)
        if excluded:
            match["not"] = CommentedMap([(key, CommentedSeq(_scalar(t) for t in excluded))])
        rm = CommentedMap([("id", r.id), ("type", r.type), ("match", match), ("severity", r.severity),
                           ("action", r.action)])
        if r.allow_missing:
            rm["allow_missing"] = True
        rules.append(rm)
    ks = policy.kill_switch
    kill = CommentedMap([("enabled", ks.enabled), ("mode", ks.mode), ("grace_period_ms", ks.grace_period_ms)])
    if ks.triggers:
        kill["triggers"] = CommentedSeq(CommentedMap([("on_rule", t)]) for t in ks.triggers)
    doc = CommentedMap([
        ("version", DoubleQuotedScalarString(policy.version)),
        ("name", _scalar(policy.name)),
        ("runtime_monitor", CommentedMap([("enabled", policy.enabled), ("rules", rules)])),
        ("kill_switch", kill),
    ])
    yaml = YAML(typ="rt")
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096            # never fold a long path across lines
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


def _scalar(text: str) -> str:
    # ruamel folds a NEL (U+0085) inside a single-quoted scalar into a space; double quotes escape it
    return DoubleQuotedScalarString(text) if any(c in text for c in "\x85\u2028\u2029") else text


def _dest_texts(dests: Tuple[Dest, ...]) -> List[str]:
    out: List[str] = []
    for d in dests:
        t = str(d)
        if t not in out:     # several addresses of one resolved name print as that name once
            out.append(t)
    return out
