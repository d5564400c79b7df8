"""The `assay` command line: parses arguments and calls into the library, nothing more."""
from __future__ import annotations

import json
import sys
from typing import List, Optional

import click
import typer

from assay import __version__, log as logsetup
from assay.errors import EXIT_USAGE, AssayError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Assay: BPF runtime security monitor.")
policy_app = typer.Typer(no_args_is_help=True, help="Check policies without loading anything.")
app.add_typer(policy_app, name="policy")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"assay {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: str = typer.Option("warning", "--log-level", help="debug|info|warning|error (to stderr)"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True),
) -> None:
    if log_level not in logsetup.LEVELS:
        raise UsageError(f"--log-level: invalid value {log_level!r} (choose debug, info, warning, error)")
    logsetup.configure(log_level)


@app.command(context_settings={"allow_interspersed_args": False})
def monitor(
    pid: List[int] = typer.Option([], "--pid", help="Monitor this process and its descendants (repeatable)."),
    cgroup: Optional[str] = typer.Option(None, "--cgroup", help="Monitor a cgroup v2 directory and its children."),
    all_: bool = typer.Option(False, "--all", help="Monitor every process on the host."),
    duration: Optional[str] = typer.Option(None, "--duration", help="Stop after this long (10s, 2m)."),
    fmt: str = typer.Option("json", "--format", help="json (one object per line) or text."),
    output_path: Optional[str] = typer.Option(None, "--output", "-o", help="Write events to FILE instead of stdout."),
    ebpf: Optional[str] = typer.Option(None, "--ebpf", help="Use this BPF object instead of the packaged one."),
    ringbuf_size: Optional[int] = typer.Option(None, "--ringbuf-size", help="Ring buffer bytes (power of 2)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Enforce this policy (YAML) in the kernel."),
    enforcer: str = typer.Option("auto", "--enforcer", help="How decisions attach: auto (lsm, else fmod_ret), "
                                                            "lsm or fmod_ret."),
    record: Optional[str] = typer.Option(None, "--record", help="Write the run's behaviour for learning mode."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id for --record (default: generated)."),
    wait_all: bool = typer.Option(False, "--wait-all", help="After COMMAND exits, wait for every process left "
                                                             "in its scope instead of ending them."),
    scope_grace: str = typer.Option("3s", "--scope-grace", help="After COMMAND exits, processes left in its scope "
                                                               "get SIGTERM, then SIGKILL after this long."),
    max_scope: int = typer.Option(65536, "--max-scope", help="Processes and threads the scope map holds; "
                                                             "once full, forks in the scope are refused."),
    no_protect: bool = typer.Option(False, "--no-protect", help="Let the scope signal, trace or take the BPF "
                                                                "objects of the monitor (docs/hardening.md)."),
    allow_mounts: bool = typer.Option(False, "--allow-mounts", help="Let the scope mount while subtree rules "
                                                                    "exist (an overlay can hide a subtree)."),
    ready_file: Optional[str] = typer.Option(None, "--ready-file", help="Write the monitor's pid to FILE once "
                                                                         "its programs are attached and the scope "
                                                                         "is set (systemd: READY=1 is sent too)."),
    stop_file: Optional[str] = typer.Option(None, "--stop-file", help="FILE holds a secret token at start "
                                                                       "(read, then removed); writing the same "
                                                                       "token to FILE later stops the monitor."),
    metrics_addr: Optional[str] = typer.Option(None, "--metrics-addr", help="Serve Prometheus metrics on "
                                                                             "HOST:PORT (loopback if only "
                                                                             ":PORT is given)."),
    decisions: str = typer.Option("policy", "--decisions", help="policy: load the decisions the policy needs; "
                                                                "all: every decision, so a reload (SIGHUP) "
                                                                "may bring rules of any type."),
    append: bool = typer.Option(False, "--append", help="Append to --output instead of truncating it."),
    dns_upstream: Optional[str] = typer.Option(None, "--dns-upstream", help="With -- COMMAND: the DNS proxy "
                                                                             "forwards to ADDR[:PORT] (default: "
                                                                             "the first nameserver of "
                                                                             "/etc/resolv.conf)."),
    dns_block: bool = typer.Option(False, "--dns-block", help="With -- COMMAND: names on no allow-list "
                                                              "(no `not:` exception) are answered NXDOMAIN."),
    dns_ttl_floor: str = typer.Option("10s", "--dns-ttl-floor", help="An address a name resolved to stays "
                                                                     "in the tries at least this long "
                                                                     "(at most 1h): docs/egress.md."),
    command: List[str] = typer.Argument(None, metavar="[-- COMMAND [ARGS]...]"),
) -> None:
    """Stream the events of a process tree, a cgroup, or a command started in scope.

    SIGHUP reloads --policy (the old one stays in force if the new one is bad) and reopens
    --output; SIGUSR1 only reopens --output (logrotate)."""
    from assay.monitor import Monitor, MonitorOptions, Scope, parse_duration

    from assay import enforcers, output

    if fmt not in ("json", "text"):
        raise UsageError(f"--format: invalid value {fmt!r} (choose json or text)")
    enforcers.candidates(enforcer)  # a bad name is a usage error before anything runs
    if ringbuf_size is not None and (ringbuf_size < 4096 or ringbuf_size & (ringbuf_size - 1)):
        raise UsageError(f"--ringbuf-size: {ringbuf_size} must be a power of 2 and at least 4096")
    if not 64 <= max_scope <= 1 << 22:
        raise UsageError(f"--max-scope: {max_scope} must be between 64 and {1 << 22}")
    if decisions not in ("policy", "all"):
        raise UsageError(f"--decisions: invalid value {decisions!r} (choose policy or all)")
    if decisions == "all" and not policy:
        raise UsageError("--decisions all needs --policy (it is for reloading one)")
    if append and not output_path:
        raise UsageError("--append needs --output")
    metrics = None
    if metrics_addr is not None:
        from assay.metrics import parse_addr
        metrics = parse_addr(metrics_addr)
    pol = None
    from assay.dns.service import DnsOptions, names_for_run
    if policy:
        from assay.policy import load_policy
        pol = load_policy(policy)
    if (dns_upstream or dns_block) and not command:
        raise UsageError("--dns-upstream and --dns-block need -- COMMAND (the DNS proxy serves the command's "
                         "mount namespace); see docs/egress.md")
    dns = None
    if command and (dns_upstream or dns_block or record or (pol is not None and pol.name_dests())):
        from assay.dns.upstream import parse_upstream
        from assay.dns.table import DEFAULT_CEILING_S
        floor = parse_duration(dns_ttl_floor)
        if floor > DEFAULT_CEILING_S:
            raise UsageError(f"--dns-ttl-floor: {dns_ttl_floor} is longer than the ceiling (1h)")
        dns = DnsOptions(upstream=parse_upstream(dns_upstream) if dns_upstream else None, block=dns_block,
                         floor=floor)
    pol = names_for_run(pol, dynamic=dns is not None)
    opts = MonitorOptions(dns=dns, policy=pol, scope=Scope(pids=tuple(pid), cgroup=cgroup, all=all_), command=tuple(command or ()),
                          duration=parse_duration(duration) if duration else None, fmt=fmt, output=output_path,
                          ebpf=ebpf, ringbuf_size=ringbuf_size, enforcer=enforcer, wait_all=wait_all,
                          scope_grace=parse_duration(scope_grace), max_scope=max_scope,
                          protect=not no_protect, protect_mounts=not allow_mounts, ready_file=ready_file,
                          stop_file=stop_file, decisions=decisions, metrics=metrics)
    recorder = None
    if record:
        from assay import learning
        from assay.policy import policy_digest
        recorder = learning.RunRecorder(record, learning.fingerprint(
            policy_digest(pol) if pol else None, opts.scope.fingerprint_options(opts.command),
            ["file_open", "net_connect", "proc_exec"]), run_id=run_id)
    elif run_id:
        raise UsageError("--run-id needs --record")
    mon = Monitor(opts, on_event=recorder.feed if recorder else None)
    try:
        out = output.EventWriter.to_path(output_path, append) if output_path else output.EventWriter.to_stdout()
    except OSError as e:
        raise UsageError(f"--output {output_path}: {e.strerror}") from None
    try:
        code = mon.run(out)
    finally:
        out.close()
        s = mon.summary
        s.output_lost, s.output_errors = out.lost, dict(out.errors)
        if mon.obj is None:  # failed before loading: the error says it all
            raise
        if recorder is not None:
            run = recorder.write()
            output.say(f"assay: recorded {len(run.items)} distinct items to {record} (run id {run.header.run_id})")
        output.say(json.dumps({"summary": s.as_dict()}) if fmt == "json" else s.as_text())
        if s.dropped:
            output.say(f"assay: WARNING: {s.dropped} events were dropped (ring buffer full); raise --ringbuf-size")
        lost = s.kernel_counters
        if lost.get("scope_fork_denied"):
            output.say(f"assay: WARNING: {lost['scope_fork_denied']} forks in the scope were refused (EAGAIN): "
                       f"the scope map was full; raise --max-scope")
        if lost.get("decisions_skipped"):
            output.say(f"assay: WARNING: the kernel skipped {lost['decisions_skipped']} run(s) of the "
                       f"{s.enforcer} decisions (a task preempted inside one makes the next task on that CPU "
                       "pass unjudged): enforcement was not complete; see docs/enforcers.md")
        if s.output_lost:
            why = ", ".join(f"{k} x{v}" for k, v in sorted(s.output_errors.items())) or "output too slow"
            output.say(f"assay: WARNING: {s.output_lost} events could not be written to "
                       f"{output_path or 'stdout'} ({why}); enforcement was not affected")
    raise typer.Exit(code)


@policy_app.command("validate")
def policy_validate(
    file: str = typer.Argument(..., help="Policy YAML file."),
    resolve: bool = typer.Option(False, "--resolve", help="Also resolve host names and rule paths to inodes."),
) -> None:
    """Check a policy strictly, without loading anything into the kernel (exit 1 on any error)."""
    from assay import enforce
    from assay.policy import load_policy, resolve_hosts

    pol = load_policy(file)
    counts = {}
    for r in pol.rules:
        counts[r.type] = counts.get(r.type, 0) + 1
    if resolve:
        pol = resolve_hosts(pol)
        plan = enforce.plan(pol)
        for note in plan.notes:
            typer.echo(f"note: {note}")
        for host, addrs in pol.resolved_hosts().items():
            typer.echo(f"note: {host} resolved to {', '.join(addrs)}")
        for d in pol.name_dests():
            typer.echo(f"note: {d.host} is followed through the DNS proxy as it resolves (needs -- COMMAND)")
    per = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    typer.echo(f"{file}: OK: policy {pol.name!r}, {len(pol.rules)} rules ({per})")


@app.command()
def doctor(
    fmt: str = typer.Option("text", "--format", help="text or json."),
    ebpf: Optional[str] = typer.Option(None, "--ebpf", help="Try loading this BPF object."),
) -> None:
    """Check kernel, BTF, BPF LSM, libbpf, privileges and cgroups; load one program of each kind."""
    from assay import doctor as doc
    from assay.monitor import default_object_path

    if fmt not in ("json", "text"):
        raise UsageError(f"--format: invalid value {fmt!r} (choose json or text)")
    checks = doc.run_checks(ebpf or default_object_path())
    typer.echo(json.dumps(doc.as_dict(checks), indent=2) if fmt == "json" else doc.as_text(checks))
    raise typer.Exit(doc.verdict(checks))


@app.command()
def report(
    events: str = typer.Argument(..., metavar="EVENTS.jsonl", help="An event log (--output) or run record (--record)."),
    fmt: str = typer.Option("markdown", "--format", help="markdown (a GitHub job summary), text or json."),
    workspace: Optional[str] = typer.Option(None, "--workspace", envvar="GITHUB_WORKSPACE", show_envvar=False,
                                            help="List files written below this directory "
                                                 "(default: $GITHUB_WORKSPACE)."),
    monitor_log: Optional[str] = typer.Option(None, "--monitor-log", help="The monitor's stderr: its summary "
                                                                           "line (dropped, lost) and resolved "
                                                                           "host names."),
    max_bytes: int = typer.Option(65536, "--max-bytes", help="Markdown size bound (0: none); lists are cut "
                                                              "to fit, with a note."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Append the report to FILE "
                                                                       "(e.g. $GITHUB_STEP_SUMMARY)."),
) -> None:
    """Summarise an event log for people: verdict, blocked events and their processes, destinations, files."""
    from assay import report as rep

    if max_bytes < 0 or 0 < max_bytes < 1024:
        raise UsageError(f"--max-bytes: {max_bytes} must be 0 (no bound) or at least 1024")
    text = rep.report_file(events, fmt, workspace=workspace, monitor_log=monitor_log,
                           max_bytes=max_bytes or None)
    if output:
        try:
            with open(output, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise UsageError(f"--output {output}: {e.strerror}") from None
    else:
        typer.echo(text, nl=False)


action_app = typer.Typer(no_args_is_help=True, help="The GitHub Action's steps (action/main.js and action/post.js "
                                                     "run these); read INPUT_* and the runner's files.")
app.add_typer(action_app, name="action")


@action_app.command("main")
def action_main() -> None:
    """Check the runner, start the monitor on the job's process tree, wait until it is attached."""
    import os

    from assay.action import main as act

    raise typer.Exit(act.run(os.environ))


@action_app.command("post")
def action_post() -> None:
    """Stop the monitor, append the report to $GITHUB_STEP_SUMMARY, exit 1 per fail-on."""
    import os

    from assay.action import post as act

    raise typer.Exit(act.run(os.environ))


profile_app = typer.Typer(no_args_is_help=True, help="Learning mode: merge recorded runs into a stability profile.")
app.add_typer(profile_app, name="profile")
DEFAULT_PROFILE = "assay-profile.yaml"


@profile_app.command("init")
def profile_init_cmd(
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help="Profile file to create."),
    name: Optional[str] = typer.Option(None, "--name", help="Profile name (default: the file's stem)."),
) -> None:
    """Create an empty learning profile; refuses to overwrite an existing one."""
    from assay import learning

    prof = learning.profile_init(profile, name)
    typer.echo(f"created profile {prof.name!r} at {profile}")


@profile_app.command("update")
def profile_update_cmd(
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help="Profile file to merge into."),
    input_: str = typer.Option(..., "--input", "-i", help="Run record from `assay monitor --record`."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Merge under this run id, not the header's."),
    force: bool = typer.Option(False, "--force", help="Merge even if the config fingerprint differs."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 if the run id is already merged."),
) -> None:
    """Merge one recorded run into the profile (idempotent, locked, atomic)."""
    from assay import learning

    typer.echo(learning.profile_update(profile, input_, run_id=run_id, force=force, strict=strict).message)


@profile_app.command("show")
def profile_show_cmd(
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help="Profile file to show."),
    fmt: str = typer.Option("text", "--format", help="text, json or yaml."),
    wilson_z: float = typer.Option(1.96, "--wilson-z", help="z of the Wilson lower bound shown."),
) -> None:
    """Each entry's runs seen out of total runs, and its Wilson lower bound."""
    from assay import learning

    typer.echo(learning.show_profile(learning.load_profile(profile), fmt, wilson_z), nl=False)


@app.command()
def generate(
    profile: str = typer.Option(DEFAULT_PROFILE, "--profile", help="Profile to generate from."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the policy here (default stdout)."),
    min_stability: float = typer.Option(0.7, "--min-stability", help="Wilson bound needed to allow an item."),
    review_threshold: float = typer.Option(0.6, "--review-threshold", help="Below --min-stability but at least "
                                                                          "this: listed for review."),
    min_runs: int = typer.Option(1, "--min-runs", help="Fewer runs than this: nothing is allowed."),
    new_is_risky: bool = typer.Option(False, "--new-is-risky", help="Below --min-runs, list items for review "
                                                                     "instead of skipping them."),
    wilson_z: float = typer.Option(1.96, "--wilson-z", help="z of the Wilson lower bound (1.96: 95%)."),
    mode: str = typer.Option("audit", "--mode", help="audit (alert) or enforce (deny) outside the allowed set."),
) -> None:
    """Write a policy for `assay monitor --policy` from a learning profile; the report goes to stderr."""
    from assay import learning

    text, report = learning.generate(learning.load_profile(profile), min_stability=min_stability,
                                     review_threshold=review_threshold, min_runs=min_runs,
                                     new_is_risky=new_is_risky, z=wilson_z, mode=mode)
    if output:
        try:
            learning.atomic_write(output, text.encode("utf-8"))
        except OSError as e:
            raise UsageError(f"--output {output}: {e.strerror}") from None
    else:
        typer.echo(text, nl=False)
    typer.echo(report.text(), err=True)


def main() -> None:
    try:
        rv = app(standalone_mode=False, prog_name="assay")
    except click.exceptions.UsageError as e:  # NoArgsIsHelpError (click 8.2+) is a subclass
        e.show()
        sys.exit(EXIT_USAGE)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except AssayError as e:
        print(f"assay: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
