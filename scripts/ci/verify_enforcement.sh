#!/usr/bin/env bash
# Fail-closed gate for pipelines: proves that this kernel really enforces an Assay policy, through
# whichever backend `assay monitor` picks (lsm, fmod_ret or host), and says which one.
#   1. `assay doctor` passes (at least one enforcement backend loads and attaches);
#   2. a canary file denied by a policy gives EPERM to a workload under `assay monitor`;
#   3. a neighbour file still opens;
#   4. the file_blocked event names the backend that denied it.
# Exits 0 only when all of this holds; otherwise non-zero with the reason on stderr.
# ASSAY (default: "python3 -m assay") selects how Assay is run; ENFORCER (default: auto) is passed
# to `assay monitor --enforcer`, to verify one backend in particular.
set -euo pipefail

read -r -a assay <<<"${ASSAY:-python3 -m assay}"
enforcer=${ENFORCER:-auto}
fail() { echo "verify_enforcement: FAIL: $*" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! doctor=$("${assay[@]}" doctor --format text 2>&1); then
    reason=$(grep -E '^\[FAIL\]' <<<"$doctor" | head -3 | tr -s ' ' | paste -sd ';' -)
    fail "assay doctor: enforcement not available here: ${reason:-see assay doctor}"
fi

echo canary >"$work/canary"
echo neighbour >"$work/neighbour"
cat >"$work/policy.yaml" <<YAML
version: "2.0"
name: verify-enforcement
runtime_monitor:
  enabled: true
  rules:
    - id: canary
      type: file_open
      match: { path_globs: ["$work/canary"] }
      action: deny
YAML

# The workload prints one verdict per file; the monitor's own exit status is checked too.
# shellcheck disable=SC2016  # expanded by the workload's shell, not here
probe='for f in canary neighbour; do if cat "$0/$f" >/dev/null 2>&1; then echo "$f=ok"; else echo "$f=denied"; fi; done'
set +e
out=$("${assay[@]}" monitor --enforcer "$enforcer" --policy "$work/policy.yaml" -o "$work/events.jsonl" \
      -- sh -c "$probe" "$work" 2>"$work/stderr")
status=$?
set -e
if [ "$status" -ne 0 ]; then
    fail "assay monitor --enforcer $enforcer exited $status: $(head -3 "$work/stderr" | paste -sd ' ' -)"
fi
grep -qx 'canary=denied' <<<"$out" || fail "the canary file was NOT denied: enforcement is not working ($out)"
grep -qx 'neighbour=ok' <<<"$out" || fail "the neighbour file was denied too: over-blocking ($out)"
blocked=$(grep '"type":"file_blocked"' "$work/events.jsonl" | head -1) || fail "no file_blocked event was reported"
used=$(sed -n 's/.*"enforcer":"\([a-z_]*\)".*/\1/p' <<<"$blocked")
[ -n "$used" ] || fail "the file_blocked event names no enforcer: $blocked"
if [ "$enforcer" != auto ] && [ "$used" != "$enforcer" ]; then
    fail "asked for --enforcer $enforcer but the event says $used"
fi
echo "verify_enforcement: OK: $(uname -r) enforces via $used (canary denied, neighbour allowed, event reported)"
