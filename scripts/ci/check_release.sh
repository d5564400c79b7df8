#!/usr/bin/env bash
# Gate for a release tag: fail before anything is built or published when
#   - the tag is not "v" + the [project] version in pyproject.toml;
#   - CHANGELOG.md has no non-empty "## [X.Y.Z]" (or "## X.Y.Z") section;
#   - with --dist DIR: DIR does not hold exactly one wheel and one sdist of
#     that version, each carrying the prebuilt BPF objects (assay/data/*.bpf.o).
# With --notes-out FILE the changelog section is written there (release notes).
#
# Usage: check_release.sh [--pyproject FILE] [--changelog FILE] [--dist DIR]
#            [--notes-out FILE] [TAG]
#        TAG defaults to $GITHUB_REF_NAME (set by Actions on a tag push).
# Exit:  0 ok; 1 a check failed (reason on stderr); 2 usage error.
set -euo pipefail

PROG=check_release
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
die_usage() { log "$*"; sed -n '/^# Usage:/,/^# Exit:/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
need_arg() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }

here="$(cd "$(dirname "$0")/../.." && pwd)"
pyproject="$here/pyproject.toml"
changelog="$here/CHANGELOG.md"
dist=""
notes_out=""
tag="${GITHUB_REF_NAME:-}"
while (($#)); do
    case "$1" in
        --pyproject) need_arg "$@"; pyproject="$2"; shift 2 ;;
        --changelog) need_arg "$@"; changelog="$2"; shift 2 ;;
        --dist) need_arg "$@"; dist="$2"; shift 2 ;;
        --notes-out) need_arg "$@"; notes_out="$2"; shift 2 ;;
        -h | --help) die_usage "help" ;;
        -*) die_usage "unknown option: $1" ;;
        *) tag="$1"; shift ;;
    esac
done
[[ -n "$tag" ]] || die_usage "no tag given (argument or GITHUB_REF_NAME)"
[[ -f "$pyproject" ]] || fail "no $pyproject"

# The first `version = "..."` inside [project]; other tables may have their own.
version="$(sed -n '/^\[project\]/,/^\[/{s/^version *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p}' "$pyproject" | head -n 1)"
[[ -n "$version" ]] || fail "no static version in the [project] table of $pyproject"

[[ "$tag" == "v$version" ]] || fail "tag '$tag' does not match the package version '$version' (expected 'v$version')"
log "tag $tag matches pyproject version $version"

[[ -f "$changelog" ]] || fail "no $changelog"
# The section body: lines after its heading up to the next "## " heading.
# Plain string compare, so dots in the version are not regex wildcards.
body="$(awk -v v="$version" '
    function heading(line,   h, rest) {
        if (substr(line, 1, 3) != "## ") return 0
        h = substr(line, 4); sub(/^\[/, "", h)
        if (substr(h, 1, length(v)) != v) return 0
        rest = substr(h, length(v) + 1)
        return rest == "" || rest ~ /^(\]|[ \t])/
    }
    heading($0) { on = 1; found = 1; next }
    on && /^## / { exit }
    on { print }
    END { if (!found) exit 3 }' "$changelog")" || fail "$changelog has no '## [$version]' section"
grep -q '[^[:space:]]' <<<"$body" || fail "the $version section of $changelog is empty"
log "$changelog has an entry for $version"
if [[ -n "$notes_out" ]]; then printf '%s\n' "$body" >"$notes_out"; fi

if [[ -n "$dist" ]]; then
    shopt -s nullglob
    wheels=("$dist"/*-"$version"-*.whl)
    sdists=("$dist"/*-"$version".tar.gz)
    others=("$dist"/*)
    ((${#wheels[@]} == 1)) || fail "expected one $version wheel in $dist, found ${#wheels[@]}"
    ((${#sdists[@]} == 1)) || fail "expected one $version sdist in $dist, found ${#sdists[@]}"
    ((${#others[@]} == 2)) || fail "$dist holds files other than the $version wheel and sdist: ${others[*]}"
    # Listings go to variables first: `grep -q` closing a pipe early would
    # SIGPIPE the lister and, under pipefail, fail a check that passed.
    listing="$(python3 -m zipfile -l "${wheels[0]}")"
    grep -qE '(^| )assay/data/[^ /]+\.bpf\.o ' <<<"$listing" ||
        fail "${wheels[0]} carries no prebuilt BPF object (assay/data/*.bpf.o)"
    listing="$(tar -tzf "${sdists[0]}")"
    grep -qE '^[^/]+/assay/data/[^/]+\.bpf\.o$' <<<"$listing" ||
        fail "${sdists[0]} carries no prebuilt BPF object (assay/data/*.bpf.o)"
    log "dist: $(basename "${wheels[0]}") and $(basename "${sdists[0]}") carry the BPF objects"
fi
log "OK: release $tag"
