"""Every PromQL expression in the Grafana dashboard names only metrics the app exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from serve_canary import rollout
from serve_canary.config import HealthConfig, PhaseConfig
from serve_canary.judge import judge
from serve_canary.metrics import ArmAggregate, RequestRecord
from serve_canary.prometheus import PrometheusExporter
from serve_canary.status import describe

DASHBOARD = Path(__file__).parents[2] / "deployments" / "grafana" / "serve-canary.json"
PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "changes",
    "label_values",
    "without",
    "avg",
    "max",
    "min",
    "count",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "le",
}


def exported_names() -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    exporter = PrometheusExporter("m")
    served = RequestRecord("r", "w", None, "canary", "v2", "ok", None, 0.1, 0.01, 0.5, 3, 5, queue_s=0.02)
    exporter.record([served])
    exporter.feedback("canary", "v2", 4.0, True)
    phases = (PhaseConfig(name="p", weight=0.1), PhaseConfig(name="full", weight=1.0))
    started = rollout.start("r", "v1", "v2", phases, 0.0)
    rolled_back = rollout.rollback(started, phases, 1.0, "by hand")
    arms = ArmAggregate(), ArmAggregate()
    for aggregate in arms:
        aggregate.add(served)
    verdict = judge(*arms, HealthConfig(), 1, 0.01, weight=0.5)
    summaries = {"stable": arms[0].summary(), "canary": arms[1].summary()}
    status = describe("app", "m", rolled_back, phases, verdict, summaries, 2.0, 2.0, {"stable": 1, "canary": 1})
    exporter.rollout(status, rolled_back.events[-1])
    return {s.name for f in text_string_to_metric_families(exporter.exposition().decode()) for s in f.samples}


def expressions(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        if isinstance(node.get("query"), str) and "label_values" in node["query"]:
            found.append(node["query"])
        return found + [e for value in node.values() for e in expressions(value)]
    if isinstance(node, list):
        return [e for item in node for e in expressions(item)]
    return []


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    without_grouping = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_ranges)
    without_grouping = re.sub(r",\s*[a-zA-Z_]+\s*\)", ")", without_grouping)  # label_values(metric, label)
    tokens = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_grouping))
    return {t for t in tokens if t not in PROMQL_WORDS and not t.startswith("__")}


def test_every_panel_names_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 12
    exported = exported_names()
    for expr in exprs:
        unknown = metric_names(expr) - exported
        assert not unknown, f"{expr!r} names {unknown}, not exported"


def test_the_dashboard_covers_what_operators_watch():
    titles = " ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]).lower()
    for needed in (
        "weight",
        "phase",
        "error rate",
        "time to first token",
        "inter-token",
        "tokens per second",
        "rollbacks",
    ):
        assert needed in titles


def test_metric_name_extraction_catches_a_typo():
    assert metric_names('sum by (arm) (rate(serve_canary_requets_total{model="$model"}[5m]))') == {
        "serve_canary_requets_total"
    }
