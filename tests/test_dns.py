"""The DNS side's pure parts: name matching, answer chains, TTL clamping, the closure of the
values the table writes (checked against enforce's own closure of the same items)."""
from __future__ import annotations

import ipaddress

import dns.message
import dns.rrset
import pytest

from assay import abi, enforce
from assay.dns.names import name_matches, name_rules
from assay.dns.proxy import parse_answer
from assay.dns.table import DynamicTable, clamp_ttl
from assay.dns.upstream import nameservers, parse_upstream, scope_resolv_conf
from assay.errors import UsageError
from assay.policy import parse_policy


@pytest.mark.parametrize("pattern,name,hit", [
    ("api.example.com", "API.Example.COM.", True),
    ("api.example.com", "x.api.example.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),        # one or more labels below the suffix
    ("*.example.com", "example.com", False),           # never the suffix itself
    ("*.example.com", "badexample.com", False),
    ("*.example.com.", "A.EXAMPLE.com", True),
])
def test_name_matches(pattern, name, hit):
    assert name_matches(pattern, name) is hit


def response(*rrsets):
    r = dns.message.make_response(dns.message.make_query("cdn.allowed.test", "A"))
    for name, ttl, typ, value in rrsets:
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", typ, value))
    return r


def test_parse_answer_follows_the_chain_from_the_name_asked_only():
    a = parse_answer("CDN.allowed.test.", response(("cdn.allowed.test.", 300, "CNAME", "edge.other.test."),
                                                    ("edge.other.test.", 20, "A", "192.0.2.1"),
                                                    ("elsewhere.test.", 5, "A", "192.0.2.99")))
    assert a.addresses == (("192.0.2.1", 20),) and a.cnames == ("edge.other.test",) and a.ttl == 20
    assert parse_answer("x.test", response()).ttl is None


def test_clamp_ttl():
    assert (clamp_ttl(0, 10, 3600), clamp_ttl(60, 10, 3600), clamp_ttl(86400, 10, 3600)) == (10, 60, 3600)


def test_upstream_parsing():
    assert parse_upstream("10.0.0.2") == ("10.0.0.2", 53)
    assert parse_upstream("10.0.0.2:5353") == ("10.0.0.2", 5353)
    assert parse_upstream("[fd00::53]:54") == ("fd00::53", 54)
    assert parse_upstream("fd00::53") == ("fd00::53", 53)
    for bad in ("dns.example", "10.0.0.2:0", "10.0.0.2:99999"):
        with pytest.raises(UsageError):
            parse_upstream(bad)
    assert nameservers("# x\nnameserver 10.1.1.1\nnameserver fe80::1%eth0\nnameserver bogus\n") == ["10.1.1.1", "fe80::1"]
    conf = scope_resolv_conf("nameserver 10.1.1.1\nsearch corp.example\noptions ndots:2\n", "127.0.53.1")
    assert "nameserver 127.0.53.1\nsearch corp.example\noptions ndots:2\n" in conf and "10.1.1.1" not in conf


class DictMap(dict):
    """Stands in for a BPF map's update/delete in a pure test of the values written."""
    def update(self, k, v):
        self[k] = v

    def delete(self, k):
        return self.pop(k, None) is not None


POLICY = """version: "2.0"
name: t
runtime_monitor:
  rules:
    - id: egress
      type: net_connect
      match:
        dest_globs: ["0.0.0.0/0", "::/0"]
        not: {dest_globs: ["127.0.0.0/8:22", "api.example.com:443", "*.cdn.example:443"]}
      action: deny
    - id: other
      type: net_connect
      match: {dest_globs: ["127.0.0.0/24:8000-8999"], not: {dest_globs: ["api.example.com"]}}
      action: alert
"""


def test_inserted_values_are_closed_like_the_plan_and_expire():
    pol = parse_policy(POLICY)
    ids = enforce.rule_ids(pol)
    plan = enforce.plan_net(pol, ids, dns_server="127.0.53.1")
    assert plan.bits & abi.NET_ALLOW4 and plan.bits & abi.NET_ALLOW6
    rules = name_rules(pol, ids)
    assert [(i.pattern, i.map_kind, i.lo, i.hi, i.rule_id) for i in rules.match("api.example.com")] == [
        ("api.example.com", "allow", 443, 443, "egress"), ("api.example.com", "allow", 0, 65535, "other")]
    assert rules.match("example.com") == () and rules.match("a.cdn.example")[0].rule_id == "egress"
    maps = {m: DictMap() for m in ("net_allow4", "net_allow6", "net_deny4", "net_deny6")}
    now = [100.0]
    table = DynamicTable(maps, plan, floor=5, ceiling=60, clock=lambda: now[0])
    assert table.add("127.0.0.9", 1, rules.match("api.example.com")) == 1
    key = enforce.lpm_key(ipaddress.ip_network("127.0.0.9/32"))
    # the same value enforce would close over the static items plus this /32's own items
    static = list(plan.items["net_allow4"])
    mine = [i.net_item(ipaddress.ip_network("127.0.0.9/32")) for i in rules.match("api.example.com")]
    assert maps["net_allow4"][key] == enforce.net_value(enforce.covering(ipaddress.ip_network("127.0.0.9/32"),
                                                                         static + mine))
    val = abi.NetValue.from_buffer_copy(maps["net_allow4"][key])
    assert val.count == 3 and {(val.ranges[i].lo, val.ranges[i].hi) for i in range(3)} == {(22, 22), (443, 443),
                                                                                          (0, 65535)}
    table.add("::ffff:127.0.0.10", 1, rules.match("api.example.com"))     # mapped: stored as IPv4
    assert enforce.lpm_key(ipaddress.ip_network("127.0.0.10/32")) in maps["net_allow4"]
    now[0] += 4.9
    assert table.expire() == 0
    now[0] += 0.2                                                            # the 5 s floor has passed
    assert table.expire() == 4 and not maps["net_allow4"]


def test_a_static_address_is_restored_not_deleted_when_its_dynamic_items_expire():
    pol = parse_policy(POLICY.replace("127.0.0.0/8:22", "127.0.0.9:22"))
    ids = enforce.rule_ids(pol)
    plan = enforce.plan_net(pol, ids)
    maps = {m: DictMap(plan.maps.get(m, {})) for m in ("net_allow4", "net_allow6", "net_deny4", "net_deny6")}
    key = enforce.lpm_key(ipaddress.ip_network("127.0.0.9/32"))
    before = maps["net_allow4"][key]
    now = [0.0]
    table = DynamicTable(maps, plan, floor=1, ceiling=60, clock=lambda: now[0])
    table.add("127.0.0.9", 1, name_rules(pol, ids).match("api.example.com"))
    assert maps["net_allow4"][key] != before
    now[0] = 2
    table.expire()
    assert maps["net_allow4"][key] == before
