#!/usr/bin/env bash
# Install apt packages from the first healthy mirror of an ordered list.
#
#   1. install-first:   try the install with what apt already has (lists and
#                       .debs from an earlier run); no index download at all.
#   2. update-fallback: for each mirror in order, `apt-get update` against it
#                       alone, then install; a dead mirror, a missing or
#                       invalid Release, a hash mismatch or a failed .deb
#                       download moves on to the next mirror.
#
# Every apt call gets -o Acquire::Retries=N (default 10) and
# -o Acquire::http::Pipeline-Depth=0: ports mirrors drop pipelined requests
# and have short outages, so one flaky response must not fail a CI job.
#
# With --root DIR everything apt reads or writes (config, sources, lists,
# cache, status, logs) lives under DIR, and packages are only downloaded into
# DIR/var/cache/apt/archives: the machine's own apt setup is never touched.
#
# Usage: apt_ports_failover.sh --mirror URI [--mirror URI ...] --suite SUITE
#            [--suite SUITE ...] [--components "main universe"] [--arch ARCH]
#            [--trusted | --signed-by KEYRING] [--root DIR] [--download-only]
#            [--print-config] PACKAGE...
# Env:   APT_FAILOVER_MIRRORS  space-separated mirrors, tried after --mirror ones
#        APT_FAILOVER_RETRIES  Acquire::Retries (default 10; tests lower it)
# Exit:  0 installed (or downloaded); 1 every mirror failed; 2 usage error.
set -euo pipefail

PROG=apt_ports_failover
RETRIES="${APT_FAILOVER_RETRIES:-10}"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die_usage() { log "$*"; sed -n '/^# Usage:/,/^# Exit:/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
need_arg() { [[ $# -ge 2 && -n "$2" ]] || die_usage "$1 needs a value"; }

mirrors=()
suites=()
packages=()
components="main"
arch=""
trusted=0
signed_by=""
root=""
download_only=0
print_config=0

while (($#)); do
    case "$1" in
        --mirror) need_arg "$@"; mirrors+=("$2"); shift 2 ;;
        --suite) need_arg "$@"; suites+=("$2"); shift 2 ;;
        --components) need_arg "$@"; components="$2"; shift 2 ;;
        --arch) need_arg "$@"; arch="$2"; shift 2 ;;
        --trusted) trusted=1; shift ;;
        --signed-by) need_arg "$@"; signed_by="$2"; shift 2 ;;
        --root) need_arg "$@"; root="$2"; shift 2 ;;
        --download-only) download_only=1; shift ;;
        --print-config) print_config=1; shift ;;
        -h | --help) die_usage "help" ;;
        --) shift; packages+=("$@"); break ;;
        -*) die_usage "unknown option: $1" ;;
        *) packages+=("$1"); shift ;;
    esac
done

if [[ -n "${APT_FAILOVER_MIRRORS:-}" ]]; then
    read -r -a env_mirrors <<<"$APT_FAILOVER_MIRRORS"
    mirrors+=("${env_mirrors[@]}")
fi
[[ "$RETRIES" =~ ^[0-9]+$ ]] || die_usage "APT_FAILOVER_RETRIES must be a number, got '$RETRIES'"
((${#mirrors[@]})) || die_usage "no mirror given (--mirror or APT_FAILOVER_MIRRORS)"
((${#suites[@]})) || die_usage "no suite given (--suite)"
((${#packages[@]} || print_config)) || die_usage "no package given"

apt_opts=(-o "Acquire::Retries=$RETRIES" -o "Acquire::http::Pipeline-Depth=0")
install_opts=(-y -q --no-install-recommends)
((download_only)) && install_opts+=(--download-only)

# Private root: an APT_CONFIG file is read before any of the host's apt.conf
# files, so pointing Dir and the config parts at DIR keeps /etc/apt out of it.
tmp=""
if [[ -n "$root" ]]; then
    mkdir -p "$root"
    root="$(cd "$root" && pwd)"
    mkdir -p "$root"/etc/apt/{apt.conf.d,preferences.d,sources.list.d,trusted.gpg.d} \
        "$root"/var/lib/apt/lists/partial "$root"/var/cache/apt/archives/partial \
        "$root"/var/lib/dpkg "$root"/var/log/apt
    [[ -e "$root/var/lib/dpkg/status" ]] || : >"$root/var/lib/dpkg/status"
    cat >"$root/apt.conf" <<EOF
Dir "$root/";
Dir::State::status "$root/var/lib/dpkg/status";
Dir::Etc::main "/dev/null";
Dir::Etc::parts "$root/etc/apt/apt.conf.d";
APT::Sandbox::User "$(id -un)";
EOF
    [[ -n "$arch" ]] && printf 'APT::Architecture "%s";\nAPT::Architectures { "%s"; };\n' "$arch" "$arch" >>"$root/apt.conf"
    export APT_CONFIG="$root/apt.conf"
    # Nothing can be installed into a private root: fetch the .debs only.
    install_opts+=(--download-only)
    sources_file="$root/etc/apt/sources.list"
    sources_parts="$root/etc/apt/sources.list.d"
else
    # Host mode: the chosen mirror is the only source apt sees for the update
    # and the install; the host's own sources files are left as they are.
    tmp="$(mktemp -d)"
    mkdir "$tmp/parts"
    sources_file="$tmp/sources.list"
    sources_parts="$tmp/parts"
fi

run_apt() {
    # The effective command goes to the log so a CI reader (and the tests) can
    # see exactly which options apt got.
    log "+ $*"
    DEBIAN_FRONTEND=noninteractive "$@"
}

if ((print_config)); then
    run_apt apt-config "${apt_opts[@]}" -o "Dir::Etc::SourceList=$sources_file" \
        -o "Dir::Etc::SourceParts=$sources_parts" dump
    exit 0
fi

write_sources() {
    local mirror="$1" opts=() suite line
    ((trusted)) && opts+=("trusted=yes")
    [[ -n "$signed_by" ]] && opts+=("signed-by=$signed_by")
    [[ -n "$arch" ]] && opts+=("arch=$arch")
    : >"$sources_file"
    for suite in "${suites[@]}"; do
        line="deb"
        ((${#opts[@]})) && line+=" [${opts[*]}]"
        printf '%s %s %s %s\n' "$line" "$mirror" "$suite" "$components" >>"$sources_file"
    done
}

src_opts=(-o "Dir::Etc::SourceList=$sources_file" -o "Dir::Etc::SourceParts=$sources_parts")

# A short reason for the summary: apt's first "Failed to fetch" (it names the
# URL and the cause), else its last error line.
reason_of() {
    local r
    r="$(grep -E '^(E|W): Failed to fetch' "$1" | head -n 1 || true)"
    [[ -n "$r" ]] || r="$(grep -E '^E:' "$1" | tail -n 1 || true)"
    printf '%s' "${r:-no error line from apt}" | cut -c1-200
}

out="$(mktemp)"
trap 'rm -rf "$out" ${tmp:+"$tmp"}' EXIT

# 1. install-first. In a private root this only works once an earlier run
# left its sources and lists there; in host mode it is the host's own setup.
first_opts=()
[[ -n "$root" ]] && first_opts=("${src_opts[@]}")
if [[ -z "$root" || -s "$sources_file" ]]; then
    if run_apt apt-get "${apt_opts[@]}" "${first_opts[@]}" install "${install_opts[@]}" \
        "${packages[@]}" >"$out" 2>&1; then
        cat "$out" >&2
        log "install-first: satisfied without an index update; no mirror contacted for lists"
        exit 0
    fi
    cat "$out" >&2
    log "install-first failed ($(reason_of "$out")); falling back to mirror updates"
fi

# 2. update-fallback.
failures=()
i=0
for mirror in "${mirrors[@]}"; do
    i=$((i + 1))
    log "trying mirror $i/${#mirrors[@]}: $mirror"
    write_sources "$mirror"
    if ! run_apt apt-get "${apt_opts[@]}" "${src_opts[@]}" update -q >"$out" 2>&1; then
        cat "$out" >&2
        failures+=("$mirror: update failed: $(reason_of "$out")")
        log "mirror $i failed at update; next"
        continue
    fi
    cat "$out" >&2
    # apt-get update exits 0 on some index problems (it only warns): a mirror
    # whose indexes were "ignored" is not healthy.
    if grep -qE '^(W|E): (Failed to fetch|Some index files failed)' "$out"; then
        failures+=("$mirror: update incomplete: $(reason_of "$out")")
        log "mirror $i gave incomplete indexes; next"
        continue
    fi
    if ! run_apt apt-get "${apt_opts[@]}" "${src_opts[@]}" install "${install_opts[@]}" \
        "${packages[@]}" >"$out" 2>&1; then
        cat "$out" >&2
        failures+=("$mirror: install failed: $(reason_of "$out")")
        log "mirror $i failed at install; next"
        continue
    fi
    cat "$out" >&2
    log "chose mirror $i: $mirror"
    if [[ -n "${GITHUB_OUTPUT:-}" ]]; then
        printf 'mirror=%s\n' "$mirror" >>"$GITHUB_OUTPUT"
    fi
    exit 0
done

log "all ${#mirrors[@]} mirrors failed:"
for f in "${failures[@]}"; do
    log "  $f"
done
exit 1
