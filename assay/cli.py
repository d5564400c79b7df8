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
                  rich_markup_mode=None, help="Assay: BPF LSM runtime security monitor.")
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
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write events to FILE instead of stdout."),
    ebpf: Optional[str] = typer.Option(None, "--ebpf", help="Use this BPF object instead of the packaged one."),
    ringbuf_size: Optional[int] = typer.Option(None, "--ringbuf-size", help="Ring buffer bytes (power of 2)."),
    command: List[str] = typer.Argument(None, metavar="[-- COMMAND [ARGS]...]"),
) -> None:
    """Stream the events of a process tree, a cgroup, or a command started in scope."""
    from assay.monitor import Monitor, MonitorOptions, Scope, parse_duration

    if fmt not in ("json", "text"):
        raise UsageError(f"--format: invalid value {fmt!r} (choose json or text)")
    if ringbuf_size is not None and (ringbuf_size < 4096 or ringbuf_size & (ringbuf_size - 1)):
        raise UsageError(f"--ringbuf-size: {ringbuf_size} must be a power of 2 and at least 4096")
    opts = MonitorOptions(scope=Scope(pids=tuple(pid), cgroup=cgroup, all=all_), command=tuple(command or ()),
                          duration=parse_duration(duration) if duration else None, fmt=fmt, output=output,
                          ebpf=ebpf, ringbuf_size=ringbuf_size)
    mon = Monitor(opts)
    try:
        out = open(output, "w", buffering=1) if output else sys.stdout
    except OSError as e:
        raise UsageError(f"--output {output}: {e.strerror}") from None
    try:
        code = mon.run(out)
    finally:
        if output:
            out.close()
        s = mon.summary
        if mon.obj is None:  # failed before loading: the error says it all
            raise
        print(json.dumps({"summary": s.as_dict()}) if fmt == "json" else s.as_text(), file=sys.stderr)
        if s.dropped:
            print(f"assay: WARNING: {s.dropped} events were dropped (ring buffer full); "
                  "raise --ringbuf-size", file=sys.stderr)
    raise typer.Exit(code)


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


def main() -> None:
    try:
        rv = app(standalone_mode=False, prog_name="assay")
    except click.exceptions.NoArgsIsHelpError as e:  # type: ignore[attr-defined]
        e.show()
        sys.exit(EXIT_USAGE)
    except click.exceptions.UsageError as e:
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
