"""`serve-canary`: check a Serve config offline, and operate a running rollout from a shell
(status, pause, resume, approve, rollback, restart, set-weight) as a Ray driver, through the
same ControllerClient the HTTP admin routes use, or with `--url` through those routes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from serve_canary.config import ADMIN_TOKEN_ENV, ConfigError, parse_config
from serve_canary.http_client import AdminRefused, HttpControllerClient
from serve_canary.rollout import TransitionError
from serve_canary.status import RolloutStatus

if TYPE_CHECKING:  # importing it imports Ray, which `check` and `--url` do without
    from serve_canary.controller import ControllerClient

IMPORT_PATH = "serve_canary.app:build_app"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve-canary", description=__doc__)
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument("--app", default="llm", help="Serve application name (default: llm)")
    parser.add_argument(
        "--url",
        help=f"operate over HTTP instead, e.g. http://host:8000/llm (the app's route), with ${ADMIN_TOKEN_ENV}",
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a Serve config file offline (no cluster needed)")
    check.add_argument("config", help="the YAML file given to `serve run` / `serve deploy`")
    status = commands.add_parser("status", help="phase, weight, verdict and recent events")
    status.add_argument("--watch", action="store_true", help="a live view, refreshed every --interval seconds")
    status.add_argument("--interval", type=float, default=1.0)
    commands.add_parser("pause", help="stop automatic promotion (rollback on FAIL stays on)")
    commands.add_parser("resume", help="resume automation at the current phase's weight")
    commands.add_parser("approve", help="approve the phase that awaits approval")
    commands.add_parser("rollback", help="send all traffic to stable")
    commands.add_parser("restart", help="start a new attempt after a rollback")
    report = commands.add_parser("report", help="write an HTML report of the rollout (charts, events, evidence)")
    report.add_argument("--out", default="serve-canary-report", help="directory for report.html and its charts")
    set_weight = commands.add_parser("set-weight", help="set the canary weight by hand (pauses automation)")
    set_weight.add_argument("weight", type=float, help="canary share of traffic, 0..1")
    return parser


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def status_view(status: RolloutStatus) -> Group:
    """The rollout at a glance: phases, weight, what it waits for, the verdict, recent events."""
    phases = Text()
    for i, phase in enumerate(status.phases):
        label = f" {phase.name} {phase.weight:.0%}{' ✋' if phase.approval else ''} "
        style = "bold white on blue" if i == status.phase_index else ("green" if i < status.phase_index else "dim")
        phases.append(label, style=style)
        if i < len(status.phases) - 1:
            phases.append(" → ", style="dim")
    header = Text.assemble(
        (f"{status.app} ", "bold"),
        f"{status.stable_version} → {status.canary_version} ",
        (f"(rollout {status.rollout_id}, attempt {status.attempt})", "dim"),
    )
    facts = Text.assemble(
        "status ",
        (status.status, "bold red" if status.status == "rolled_back" else "bold"),
        "   canary weight ",
        (f"{status.canary_weight:.0%}", "bold"),
        f"   time in phase {status.time_in_phase_s:.0f} s",
    )
    parts: list[Any] = [header, phases, facts]
    if status.waiting_for:
        parts.append(Text(f"waiting for: {status.waiting_for}", style="yellow"))
    if status.capacity:
        parts.append(Text(f"capacity: {status.capacity}", style="bold magenta"))
    throughput = status.tokens_per_s_per_replica or {}
    load = [
        f"{arm}: queued p95 {_fmt(summary.queue_ms.p95)} ms"
        + (f", {throughput[arm]:,.0f} output tokens/s per replica" if arm in throughput else "")
        for arm, summary in (status.arms or {}).items()
    ]
    if load:
        parts.append(Text("load  " + "; ".join(load)))
    verdict = status.last_verdict
    if verdict:
        table = Table(title=f"verdict {verdict.decision.upper()}: {verdict.reason}", title_justify="left", expand=True)
        for column in ("metric", "stable", "canary", "allowed", "e-value", "decision"):
            table.add_column(column)
        colours = {"pass": "green", "wait": "yellow", "fail": "bold red"}
        for check in verdict.checks:
            table.add_row(
                check.metric,
                _fmt(check.stable),
                _fmt(check.canary),
                _fmt(check.limit),
                _fmt(check.e_value),
                Text(check.decision, style=colours[check.decision]),
            )
        parts.append(table)
        parts.extend(Text(f"ALERT: {alert}", style="bold magenta") for alert in verdict.alerts)
    if status.shadow is not None and status.shadow.examples:
        examples = Table(title=f"shadow pairs: {status.shadow.pairs} compared", title_justify="left", expand=True)
        for column in ("prompt", "stable answered", "canary answered", "worse, by comparator"):
            examples.add_column(column)
        for example in status.shadow.examples:
            worse = ", ".join(f"{name}: {arm}" for name, arm in example.worse.items())
            examples.add_row(example.prompt, example.stable, example.canary, worse)
        parts.append(examples)
    events = Table(title="recent events", title_justify="left", expand=True)
    for column in ("at", "action", "to", "phase", "weight", "reason"):
        events.add_column(column)
    for event in status.events[-8:]:
        at = datetime.fromtimestamp(event.at).strftime("%H:%M:%S")
        events.add_row(at, event.action, event.to_status, event.phase, f"{event.weight:.0%}", event.reason)
    parts.append(events)
    return Group(*parts)


async def _run(args: argparse.Namespace) -> RolloutStatus | Path:
    client: ControllerClient | HttpControllerClient
    if args.url:
        client = HttpControllerClient(args.url, os.environ.get(ADMIN_TOKEN_ENV))
    else:
        from serve_canary.controller import ControllerClient

        client = ControllerClient.for_app(args.app)
    if args.command == "set-weight":
        return await client.set_weight(args.weight)
    if args.command == "report":
        from serve_canary.report import write_report  # matplotlib: only for reports

        return write_report(await client.status(), await client.history(), Path(args.out), time.time())
    if args.command == "status" and args.watch:
        with Live(status_view(await client.status()), auto_refresh=False) as live:
            while True:
                await asyncio.sleep(args.interval)
                live.update(status_view(await client.status()), refresh=True)
    status: RolloutStatus = await getattr(client, args.command)()
    return status


def _stop(signum: int, frame: object) -> None:
    """SIGTERM ends a `--watch` the way Ctrl-C does: quietly."""
    raise KeyboardInterrupt


def check(path: str) -> list[str]:
    """Every problem with the serve-canary apps of a Serve config file, each naming its key."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path}: {exc}"]
    applications = document.get("applications") if isinstance(document, dict) else None
    if not isinstance(applications, list):
        return [f"{path}: no `applications:` list"]
    problems, checked = [], 0
    for index, application in enumerate(applications):
        if not isinstance(application, dict) or application.get("import_path") != IMPORT_PATH:
            continue
        checked += 1
        name = application.get("name", f"applications[{index}]")
        try:
            parse_config(application.get("args") or {})
        except ConfigError as exc:
            problems.append(f"{path}: application {name!r}: {exc}")
    if not checked:
        problems.append(f"{path}: no application has import_path {IMPORT_PATH}")
    return problems


def _ray_init(address: str) -> None:
    # As Ray's own CLIs do: with no mode set and a token at hand, use token auth, also for an
    # explicit --address (ray.init alone does so only for a cluster it finds itself). Before
    # Ray is imported: it reads the mode once.
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or Path(token_path).exists()):
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    from serve_canary.controller import NAMESPACE

    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        problems = check(args.config)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{args.config}: ok")
        return 1 if problems else 0
    if args.command == "set-weight" and not 0.0 <= args.weight <= 1.0:
        print(f"serve-canary: weight must be within [0, 1], got {args.weight}", file=sys.stderr)
        return 2
    if not args.url:
        _ray_init(args.address)
    signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs its own handler
    try:
        result = asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0
    except (TransitionError, AdminRefused, httpx.HTTPError) as exc:
        print(f"serve-canary: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # no such actor: the app is not running
        print(f"serve-canary: no rollout found for app {args.app!r}: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, Path):
        print(f"report written to {result}")
    elif args.json:
        print(result.model_dump_json(indent=2))
    else:
        Console().print(status_view(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
