"""Which rules a DNS name falls under: pure functions over the policy's host-name items."""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import attrs

from assay import abi, enforce


def canonical(name: str) -> str:
    """Lower case, no trailing dot: the form every comparison uses (DNS names are case-blind)."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def name_matches(pattern: str, name: str) -> bool:
    """`*.SUFFIX` matches one or more labels below SUFFIX, never SUFFIX itself; anything else
    matches exactly that name."""
    pattern, name = canonical(pattern), canonical(name)
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


@attrs.frozen
class NameItem:
    """One host-name dest_globs item of one rule: where its addresses go, and for which ports."""
    pattern: str
    map_kind: str          # "allow" (a `not:` exception) or "deny"
    lo: int
    hi: int
    rule_index: int
    action: abi.Action
    rule_id: str

    def net_item(self, network) -> enforce.NetItem:
        return enforce.NetItem(network, self.lo, self.hi, self.rule_index, self.action)


@attrs.frozen
class NameRules:
    items: Tuple[NameItem, ...] = ()

    def match(self, name: str) -> Tuple[NameItem, ...]:
        return tuple(i for i in self.items if name_matches(i.pattern, name))

    def allowed(self, name: str) -> bool:
        """Is the name on an allow-list (a `not:` exception of some rule)?"""
        return any(i.map_kind == "allow" for i in self.match(name))


def name_rules(policy, ids: Optional[Mapping[str, int]] = None) -> NameRules:
    """The policy's host-name items, with the rule numbers the kernel's entries carry."""
    if policy is None or not policy.enabled:
        return NameRules()
    ids = ids or enforce.rule_ids(policy)
    out: List[NameItem] = []
    for rule in policy.rules:
        if rule.type != "net_connect":
            continue
        action = enforce.rule_action(policy, rule)
        for kind, dests in (("deny", rule.dests), ("allow", rule.not_dests)):
            for d in dests:
                if d.unresolved:
                    out.append(NameItem(canonical(d.host), kind, d.port_lo, d.port_hi, ids[rule.id], action,
                                        rule.id))
    return NameRules(tuple(out))
