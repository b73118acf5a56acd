"""`serve-canary`: operate a running rollout from a shell (status, pause, resume, approve,
rollback, restart, set-weight), through the same ControllerClient the HTTP admin routes use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from serve_canary.rollout import TransitionError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve-canary", description=__doc__)
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument("--app", default="llm", help="Serve application name (default: llm)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="phase, weight, verdict and recent events")
    commands.add_parser("pause", help="stop automatic promotion (rollback on FAIL stays on)")
    commands.add_parser("resume", help="resume automation at the current phase's weight")
    commands.add_parser("approve", help="approve the phase that awaits approval")
    commands.add_parser("rollback", help="send all traffic to stable")
    commands.add_parser("restart", help="start a new attempt after a rollback")
    set_weight = commands.add_parser("set-weight", help="set the canary weight by hand (pauses automation)")
    set_weight.add_argument("weight", type=float, help="canary share of traffic, 0..1")
    return parser


def render_status(status: dict[str, Any], console: Console) -> None:
    """A human summary of a status dict."""
    phases = " → ".join(
        f"[bold reverse]{p['name']} {p['weight']:.0%}[/]" if i == status["phase_index"] else f"{p['name']} {p['weight']:.0%}"
        for i, p in enumerate(status["phases"])
    )
    console.print(f"[bold]{status['app']}[/] {status['stable_version']} → {status['canary_version']} (attempt {status['attempt']})")
    console.print(f"status [bold]{status['status']}[/]  canary weight [bold]{status['canary_weight']:.0%}[/]  "
                  f"time in phase {status['time_in_phase_s']:.0f} s")
    console.print(f"phases: {phases}")
    if status["waiting_for"]:
        console.print(f"waiting for: {status['waiting_for']}")
    verdict = status.get("last_verdict")
    if verdict:
        table = Table(title=f"verdict: {verdict['decision'].upper()} — {verdict['reason']}")
        for column in ("metric", "stable", "canary", "limit", "decision"):
            table.add_column(column)
        for check in verdict["checks"]:
            fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
            table.add_row(check["metric"], fmt(check["stable"]), fmt(check["canary"]), fmt(check["limit"]), check["decision"])
        console.print(table)
    events = Table(title="recent events")
    for column in ("at", "action", "to", "phase", "weight", "reason"):
        events.add_column(column)
    from datetime import datetime

    for event in status["events"][-8:]:
        at = datetime.fromtimestamp(event["at"]).strftime("%H:%M:%S")
        events.add_row(at, event["action"], event["to_status"], event["phase"], f"{event['weight']:.0%}", event["reason"])
    console.print(events)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from serve_canary.controller import ControllerClient

    client = ControllerClient.for_app(args.app)
    if args.command == "set-weight":
        return await client.set_weight(args.weight)
    return await getattr(client, args.command)()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "set-weight" and not 0.0 <= args.weight <= 1.0:
        print(f"serve-canary: weight must be within [0, 1], got {args.weight}", file=sys.stderr)
        return 2
    import ray

    from serve_canary.controller import NAMESPACE

    ray.init(address=args.address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    try:
        status = asyncio.run(_run(args))
    except TransitionError as exc:
        print(f"serve-canary: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # no such actor: the app is not running
        print(f"serve-canary: no rollout found for app {args.app!r}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        render_status(status, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
