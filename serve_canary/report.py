"""A rollout report for a change ticket: one self-contained HTML file and its PNG charts.

Built from what the controller keeps — the status (the current window's per-arm figures and
last verdict) and every event with the judge's evidence at each decision — so it can be
written at any time, by a Ray driver or over HTTP. Charts are drawn with matplotlib and
embedded in the HTML as data URIs (the PNGs are written next to it as well).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from serve_canary.metrics import ArmSummary
from serve_canary.rollout import Event
from serve_canary.routing import Arm
from serve_canary.status import RolloutStatus

ARM_COLOURS = {"stable": "#2563eb", "canary": "#ea580c"}
ROLLBACK_ACTIONS = ("auto_rollback", "rollback")


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _weights_chart(events: Sequence[Event], now: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3))
    times = [event.at for event in events] + [now]
    weights = [event.weight for event in events] + [events[-1].weight]
    ax.step([t - times[0] for t in times], [100 * w for w in weights], where="post", color="#1d4ed8")
    for event in events:
        if event.action in ROLLBACK_ACTIONS or event.action in ("promote", "approve", "await_approval"):
            colour = "#dc2626" if event.action in ROLLBACK_ACTIONS else "#16a34a"
            ax.axvline(event.at - times[0], color=colour, linestyle=":", linewidth=1)
            ax.text(event.at - times[0], 102, event.action, rotation=90, fontsize=7, color=colour, va="bottom")
    ax.set_ylim(0, 125)
    ax.set_xlabel("seconds since the first event")
    ax.set_ylabel("canary weight (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _arms_chart(arms: Mapping[Arm, ArmSummary], path: Path) -> None:
    import matplotlib.pyplot as plt

    panels: list[tuple[str, dict[Arm, dict[str, float | None]]]] = [
        (
            "error rate (%)",
            {arm: {"": None if s.error_rate is None else 100 * s.error_rate} for arm, s in arms.items()},
        ),
        *(
            (
                f"{name} (ms)",
                {arm: getattr(s, field).model_dump() for arm, s in arms.items()},
            )
            for name, field in (("TTFT", "ttft_ms"), ("inter-token", "itl_ms"), ("end-to-end", "e2e_ms"))
        ),
        ("output tokens per answer", {arm: s.tokens_per_answer.model_dump() for arm, s in arms.items()}),
        ("mean rating", {arm: {"": s.mean_rating} for arm, s in arms.items()}),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3))
    for ax, (title, values) in zip(axes, panels, strict=True):
        labels = list(next(iter(values.values())).keys()) if values else []
        for index, (arm, figures) in enumerate(values.items()):
            xs = [position + 0.4 * index for position in range(len(labels))]
            ax.bar(xs, [figures[label] or 0.0 for label in labels], 0.4, label=arm, color=ARM_COLOURS.get(arm))
        ax.set_xticks([position + 0.2 for position in range(len(labels))], labels)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _evidence_chart(event: Event, path: Path) -> bool:
    """Each metric's e-value for "the canary is worse" at one decision, against the threshold
    that rolls back; False if the decision carries no e-values."""
    import matplotlib.pyplot as plt

    checks = [c for c in (event.evidence or {}).get("checks", []) if (c.get("stats") or {}).get("e_value") is not None]
    if not checks:
        return False
    fig, ax = plt.subplots(figsize=(12, 3))
    names = [c["metric"] for c in checks]
    colours = ["#dc2626" if c["decision"] == "fail" else "#6b7280" for c in checks]
    ax.bar(names, [max(c["stats"]["e_value"], 1e-3) for c in checks], color=colours)
    ax.scatter(
        names, [c["stats"]["e_threshold"] for c in checks], marker="_", s=400, color="#111827", label="rollback at"
    )
    ax.set_yscale("log")
    ax.set_ylabel("e-value: canary worse")
    ax.set_title(f"{event.action} → {event.to_status}", fontsize=9)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('—' if v is None else str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "—" if value is None else str(value)


def _evidence(events: Sequence[Event]) -> str:
    """The judge's checks behind each decision that carries them."""
    sections = []
    for event in events:
        checks = (event.evidence or {}).get("checks") or []
        if not checks:
            continue
        rows = [
            (
                c["metric"],
                _figure(c.get("stable")),
                _figure(c.get("canary")),
                _figure(c.get("limit")),
                _figure((c.get("stats") or {}).get("e_value")),
                c["decision"],
                c["reason"],
            )
            for c in checks
        ]
        title = f"{_when(event.at)} · {event.action} → {event.to_status} · {event.reason}"
        table = _table(("metric", "stable", "canary", "allowed", "e-value", "decision", "why"), rows)
        sections.append(f"<h3>{html.escape(title)}</h3>{table}")
    return "".join(sections) or "<p>No decision with evidence yet.</p>"


def write_report(status: RolloutStatus, events: Sequence[Event], out: Path, now: float) -> Path:
    """Write `report.html` (charts embedded) and the charts as PNGs into `out`; return the HTML's path."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    charts = {"weights.png": "canary weight over time, with the decisions"}
    _weights_chart(events, now, out / "weights.png")
    if status.arms:
        _arms_chart(status.arms, out / "arms.png")
        charts["arms.png"] = f"stable and canary in the current window ({status.window})"
    decided = [event for event in events if event.evidence]
    if decided and _evidence_chart(decided[-1], out / "decision.png"):
        charts["decision.png"] = f"the judge's e-values at the last decision ({_when(decided[-1].at)})"
    images = "".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in charts.items()
    )
    event_rows = [
        (_when(e.at), e.action, f"{e.from_status or '—'} → {e.to_status}", e.phase, f"{e.weight:.0%}", e.reason)
        for e in events
    ]
    verdict = status.last_verdict
    summary = [
        ("app", status.app),
        ("model", status.model),
        ("versions", f"{status.stable_version} → {status.canary_version}"),
        ("rollout", f"{status.rollout_id}, attempt {status.attempt}"),
        ("status", f"{status.status}, phase {status.phase} at {status.canary_weight:.0%}"),
        ("last verdict", f"{verdict.decision}: {verdict.reason}" if verdict else None),
        ("written", _when(now)),
    ]
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>serve-canary report: {html.escape(status.rollout_id)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; }}
table {{ border-collapse: collapse; width: 100%; margin: 8px 0 20px; }}
th, td {{ text-align: left; padding: 4px 8px; border-bottom: 1px solid #e5e7eb; vertical-align: top; }}
img {{ max-width: 100%; }} figcaption {{ color: #6b7280; }} h3 {{ font-size: 14px; }}
</style></head><body>
<h1>{html.escape(status.model)}: {html.escape(status.stable_version)} → {html.escape(status.canary_version)}</h1>
{_table(("", ""), summary)}
{images}
<h2>Events</h2>
{_table(("at", "action", "status", "phase", "weight", "reason"), event_rows)}
<h2>The judge's evidence at each decision</h2>
{_evidence(events)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(document)
    return path
