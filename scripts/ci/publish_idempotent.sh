#!/usr/bin/env bash
# Upload dist files (wheel, sdist) to a package index so that re-running a
# release job is safe:
#   - "this exact version already exists" (HTTP 409, or 400/403 saying the
#     file already exists) counts as success, whatever the file's content;
#   - transient errors (HTTP 5xx, connection refused/reset, timeouts) are
#     retried with exponential backoff, a bounded number of times (one attempt
#     is one twine run; twine itself re-sends a 5xx upload up to 5 times at
#     once, and retries a refused connection 5 times, within that run);
#   - any other error fails at once;
#   - afterwards every file must be listed on the index's simple API page
#     (PEP 503), or the run fails.
# With --require-same-digest an existing file must also have our sha256.
#
# Usage: publish_idempotent.sh --repository-url URL [--simple-url URL]
#            [--require-same-digest] DIST_FILE...
# Env:   PUBLISH_TOKEN          API token (sent as user __token__); otherwise
#                               TWINE_USERNAME / TWINE_PASSWORD as usual
#        PUBLISH_ATTEMPTS       tries per upload and for visibility (default 5)
#        PUBLISH_BACKOFF_BASE   first delay in seconds, doubled each try (default 2)
#        PUBLISH_BACKOFF_MAX    delay cap in seconds (default 60)
#        PUBLISH_PYTHON         interpreter that has twine (default python3)
# Exit:  0 published or already there; 1 failed; 2 usage error.
set -euo pipefail

PROG=publish_idempotent
ATTEMPTS="${PUBLISH_ATTEMPTS:-5}"
BACKOFF_BASE="${PUBLISH_BACKOFF_BASE:-2}"
BACKOFF_MAX="${PUBLISH_BACKOFF_MAX:-60}"
PY="${PUBLISH_PYTHON:-python3}"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die_usage() { log "$*"; sed -n '/^# Usage:/,/^# Exit:/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
need_arg() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }

repo_url=""
simple_url=""
same_digest=0
files=()
while (($#)); do
    case "$1" in
        --repository-url) need_arg "$@"; repo_url="$2"; shift 2 ;;
        --simple-url) need_arg "$@"; simple_url="$2"; shift 2 ;;
        --require-same-digest) same_digest=1; shift ;;
        -h | --help) die_usage "help" ;;
        --) shift; files+=("$@"); break ;;
        -*) die_usage "unknown option: $1" ;;
        *) files+=("$1"); shift ;;
    esac
done
[[ -n "$repo_url" ]] || die_usage "--repository-url is required"
((${#files[@]})) || die_usage "no dist file given"
[[ "$ATTEMPTS" =~ ^[1-9][0-9]*$ ]] || die_usage "PUBLISH_ATTEMPTS must be >= 1"
for f in "${files[@]}"; do
    [[ -f "$f" ]] || die_usage "no such file: $f"
    case "$f" in *.whl | *.tar.gz | *.zip) ;; *) die_usage "not a dist file: $f" ;; esac
done
# An upload endpoint ".../legacy/" has its simple API at ".../simple/" on the
# same host for most indexes; anything else must be given.
if [[ -z "$simple_url" ]]; then
    simple_url="${repo_url%/}"
    simple_url="${simple_url%/legacy}/simple/"
fi

if [[ -n "${PUBLISH_TOKEN:-}" ]]; then
    export TWINE_USERNAME="__token__" TWINE_PASSWORD="$PUBLISH_TOKEN"
fi
# Credentials come from the environment only, never from argv (argv is
# visible in ps and in CI logs). An index without auth still gets a pair.
export TWINE_USERNAME="${TWINE_USERNAME:-anonymous}" TWINE_PASSWORD="${TWINE_PASSWORD:-none}"
export TWINE_NON_INTERACTIVE=1
# Plain output: no colour codes in what classify() reads.
export NO_COLOR=1 TERM=dumb

out="$(mktemp)"
trap 'rm -f "$out"' EXIT

backoff() {
    # delay = base * 2^(attempt-1), capped; awk does the float math.
    awk -v b="$BACKOFF_BASE" -v n="$1" -v m="$BACKOFF_MAX" \
        'BEGIN { d = b * 2 ^ (n - 1); if (d > m) d = m; printf "%g", d }'
}

# Sort twine's result into uploaded / exists / transient / fatal. twine wraps
# the server's message over lines, so match on the text with whitespace folded.
classify() {
    local rc="$1" status flat
    if ((rc == 0)); then echo uploaded; return; fi
    flat="$(tr -s '[:space:]' ' ' <"$out")"
    status="$(grep -oE 'HTTPError: [0-9]{3}' <<<"$flat" | tail -n 1 | grep -oE '[0-9]{3}' || true)"
    if [[ "$status" == 409 ]]; then echo exists; return; fi
    if [[ "$status" =~ ^(400|403)$ ]] &&
        grep -qiE 'already exists|already been used|file exists' <<<"$flat"; then
        echo exists
        return
    fi
    if [[ "$status" =~ ^5[0-9][0-9]$ ]]; then echo transient; return; fi
    if [[ -z "$status" ]] &&
        grep -qE 'ConnectionError|Connection refused|Connection reset|RemoteDisconnected|Timeout|timed out' <<<"$flat"; then
        echo transient
        return
    fi
    echo fatal
}

existing=()
for f in "${files[@]}"; do
    name="$(basename "$f")"
    attempt=1
    while :; do
        log "upload $name (attempt $attempt/$ATTEMPTS)"
        rc=0
        "$PY" -m twine --no-color upload --verbose --disable-progress-bar \
            --repository-url "$repo_url" "$f" >"$out" 2>&1 || rc=$?
        verdict="$(classify "$rc")"
        case "$verdict" in
            uploaded) log "uploaded $name"; break ;;
            exists)
                log "$name: this version already exists on the index; treating as success"
                existing+=("$name")
                break
                ;;
            fatal)
                sed 's/[[:space:]]*$//' "$out" >&2
                log "FAILED: $name: non-retryable error (twine exit $rc)"
                exit 1
                ;;
        esac
        # transient
        reason="$(grep -oE 'HTTPError: [0-9]{3}[^<]*|ConnectionError.*|Connection refused' "$out" |
            tail -n 1 | sed 's/[[:space:]]*$//' | cut -c1-160 || true)"
        if ((attempt >= ATTEMPTS)); then
            sed 's/[[:space:]]*$//' "$out" >&2
            log "FAILED: $name: still failing after $ATTEMPTS attempts (${reason:-transient error})"
            exit 1
        fi
        delay="$(backoff "$attempt")"
        log "$name: transient error (${reason:-unknown}); retrying in ${delay}s"
        sleep "$delay"
        attempt=$((attempt + 1))
    done
done

# Visibility: every file must be on the project's simple page. Indexes can
# lag behind an accepted upload, so this is retried with the same backoff.
check_visible() {
    "$PY" - "$simple_url" "$same_digest" "${existing[*]:-}" "${files[@]}" <<'EOF'
import hashlib, html, os, re, sys, urllib.request

simple, same_digest, existing, files = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split(), sys.argv[4:]

def project(fn):
    # Wheel and sdist names both start with "<name>-<version>".
    base = os.path.basename(fn)
    name = base.split("-")[0] if base.endswith(".whl") else base.rsplit("-", 1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()

pages, bad = {}, 0
for fn in files:
    proj = project(fn)
    if proj not in pages:
        url = simple.rstrip("/") + "/" + proj + "/"
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                pages[proj] = html.unescape(r.read().decode("utf-8", "replace"))
        except Exception as e:  # noqa: BLE001 - report any fetch failure
            print(f"not visible: {url}: {e}")
            pages[proj] = ""
    base = os.path.basename(fn)
    m = re.search(r'href="([^"]*/)?' + re.escape(base) + r'(#([a-z0-9]+)=([0-9a-f]+))?"', pages[proj])
    if not m:
        print(f"not visible: {base} is not listed on {simple.rstrip('/')}/{proj}/")
        bad = 1
        continue
    with open(fn, "rb") as f:
        ours = hashlib.sha256(f.read()).hexdigest()
    theirs = m.group(4) if m.group(3) == "sha256" else None
    if theirs and theirs != ours:
        msg = f"{base}: index has sha256 {theirs[:16]}..., ours is {ours[:16]}..."
        if same_digest:
            print("digest mismatch: " + msg)
            bad = 1
        else:
            print("note: existing file differs (kept, as this version already exists): " + msg)
    else:
        print(f"visible: {base}" + (" (sha256 matches)" if theirs else ""))
sys.exit(bad)
EOF
}

attempt=1
while :; do
    rc=0
    check_visible >"$out" 2>&1 || rc=$?
    sed 's/^/  /' "$out" >&2
    if ((rc == 0)); then
        log "OK: ${#files[@]} file(s) visible at $simple_url (${#existing[@]} already existed)"
        exit 0
    fi
    if grep -q '^digest mismatch' "$out"; then
        log "FAILED: an existing file differs from ours and --require-same-digest is set"
        exit 1
    fi
    if ((attempt >= ATTEMPTS)); then
        log "FAILED: not visible on the index after $ATTEMPTS checks"
        exit 1
    fi
    delay="$(backoff "$attempt")"
    log "not visible yet; checking again in ${delay}s"
    sleep "$delay"
    attempt=$((attempt + 1))
done
