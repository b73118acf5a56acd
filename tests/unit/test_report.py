"""The rollout report: a self-contained HTML file with its charts, events and evidence."""

from __future__ import annotations

from serve_canary import rollout
from serve_canary.config import HealthConfig, PhaseConfig
from serve_canary.judge import Verdict, judge
from serve_canary.metrics import MetricsLedger, RequestRecord
from serve_canary.report import write_report
from serve_canary.status import describe

PHASES = (PhaseConfig(name="init", weight=0.05), PhaseConfig(name="full", weight=1.0))


def test_a_rolled_back_rollout_reports_its_charts_events_and_the_evidence(tmp_path):
    ledger = MetricsLedger()
    for i in range(300):
        arm = "canary" if i % 10 == 0 else "stable"
        outcome = "error" if arm == "canary" and i % 20 == 0 else "ok"
        ledger.add([RequestRecord(f"r{i}", "w", None, arm, "v", outcome, None, 0.05, 0.01, 0.5, 3, 20)])
    arms = ledger.window("w")
    verdict: Verdict = judge(arms["stable"], arms["canary"], HealthConfig(), 1, 0.01, weight=0.1)
    state = rollout.start("r1", "v1", "v2", PHASES, 0.0)
    state = rollout.evaluate(state, verdict, PHASES, 5.0, auto_rollback=True)
    assert state.status == "rolled_back" and state.events[-1].evidence is not None
    status = describe("llm", "demo", state, PHASES, verdict, {a: s.summary() for a, s in arms.items()}, 5.0, 7.0)
    path = write_report(status, state.events, tmp_path / "report", now=8.0)
    page = path.read_text()
    assert (tmp_path / "report" / "weights.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "report" / "arms.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "report" / "decision.png").read_bytes().startswith(b"\x89PNG")
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")
    assert "auto_rollback" in page and "rolled_back" in page  # the events table
    assert "The judge&#x27;s evidence" in page or "evidence at each decision" in page
    assert "<td>error_rate</td>" in page and "<td>fail</td>" in page  # the checks behind the rollback
