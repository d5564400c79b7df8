"""net_connect rules to LPM trie entries: the closure that lets one longest-prefix match decide."""
import ipaddress

from assay import abi, enforce
from assay.policy import parse_policy


def pol(rules):
    return parse_policy('version: "2.0"\nname: t\nruntime_monitor:\n  enabled: true\n  rules:\n' + rules, "p.yaml")


def decode(entries, v6=False):
    out = {}
    for k, v in entries.items():
        key = (abi.Lpm6Key if v6 else abi.Lpm4Key).from_buffer_copy(k)
        val = abi.NetValue.from_buffer_copy(v)
        net = ipaddress.ip_network((bytes(key.addr), key.prefixlen))
        out[str(net)] = [(r.lo, r.hi, r.rule_id, abi.Action(r.action).name) for r in val.ranges[:val.count]]
    return out


def test_longer_prefix_inherits_covering_ranges():
    p = enforce.plan_net(pol(
        "    - id: ssh\n      type: net_connect\n      match: { dest_globs: ['22'] }\n      action: deny\n"
        "    - id: lan\n      type: net_connect\n      match: { dest_globs: ['10.0.0.0/8'], not: { dest_globs: ['10.1.2.3:443'] } }\n"
        "      action: alert\n"))
    deny4 = decode(p.maps["net_deny4"])
    assert deny4 == {"0.0.0.0/0": [(22, 22, 1, "DENY")],
                     "10.0.0.0/8": [(22, 22, 1, "DENY"), (0, 65535, 2, "ALERT")]}
    assert decode(p.maps["net_deny6"], v6=True) == {"::/0": [(22, 22, 1, "DENY")]}
    assert decode(p.maps["net_allow4"]) == {"10.1.2.3/32": [(443, 443, 2, "ALERT")]}
    assert p.bits == abi.NET_DENY4 | abi.NET_DENY6 | abi.NET_ALLOW4


def test_port_range_and_v6_and_mapped_v4():
    p = enforce.plan_net(pol(
        "    - id: r\n      type: net_connect\n      match: { dest_globs: ['8000-8999', '[::1]:80', '::ffff:127.0.0.1'] }\n"
        "      action: deny\n"))
    assert sorted(decode(p.maps["net_deny4"])["127.0.0.1/32"]) == [(0, 65535, 1, "DENY"), (8000, 8999, 1, "DENY")]
    assert sorted(decode(p.maps["net_deny6"], v6=True)["::1/128"]) == [(80, 80, 1, "DENY"), (8000, 8999, 1, "DENY")]
