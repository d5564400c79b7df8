#!/usr/bin/env bash
# Fail-closed gate for pipelines: proves that this kernel really enforces an Assay policy.
#   1. `assay doctor` passes (BPF LSM active, an LSM program loads and attaches);
#   2. a canary file denied by a policy gives EPERM to a workload under `assay monitor`;
#   3. a neighbour file still opens.
# Exits 0 only when all three hold; otherwise non-zero with the reason on stderr.
# ASSAY (default: "python3 -m assay") selects how Assay is run.
set -euo pipefail

read -r -a assay <<<"${ASSAY:-python3 -m assay}"
fail() { echo "verify_lsm: FAIL: $*" >&2; exit 1; }

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
name: verify-lsm
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
out=$("${assay[@]}" monitor --policy "$work/policy.yaml" -o "$work/events.jsonl" -- sh -c "$probe" "$work" 2>"$work/stderr")
status=$?
set -e
if [ "$status" -ne 0 ]; then
    fail "assay monitor exited $status: $(tail -1 "$work/stderr")"
fi
grep -qx 'canary=denied' <<<"$out" || fail "the canary file was NOT denied: enforcement is not working ($out)"
grep -qx 'neighbour=ok' <<<"$out" || fail "the neighbour file was denied too: over-blocking ($out)"
grep -q '"type":"file_blocked"' "$work/events.jsonl" || fail "no file_blocked event was reported"
echo "verify_lsm: OK: $(uname -r) enforces (canary denied, neighbour allowed, event reported)"
