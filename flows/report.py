"""What a flow run tells its user: a markdown summary per stage (a Prefect artifact) and the closing lines."""

from __future__ import annotations

import json
from typing import Any

from flows.registry import STAGES, stage
from ldm import budget
from ldm.config import PipelineConfig
from ldm.stage import Workdir

_COUNT_KEYS = ("rows", "rows_in", "kept", "dropped", "samples", "steps", "skipped_steps", "parts_resumed")


def mlflow_ui_command(tracking_uri: str) -> str:
    """How to open the MLflow UI on a tracking store (a server URL is opened in a browser instead)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1"


def mlflow_link(tracking_uri: str, run_id: str | None) -> str | None:
    """A link to an MLflow run on a tracking server, or the run id with the UI command for a local store."""
    if not run_id:
        return None
    if tracking_uri.startswith(("http://", "https://")):
        try:
            from mlflow import MlflowClient

            experiment = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
            return f"[{run_id}]({tracking_uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"
        except Exception:  # noqa: BLE001 - a link is a courtesy; the run id alone still finds the run
            return run_id
    return f"{run_id} (`{mlflow_ui_command(tracking_uri)}`)"


def _mlflow_run(m: dict) -> str | None:
    return m.get("mlflow_run_id") or m.get("mlflow_parent_run_id")


def _counts(m: dict) -> str:
    counts = dict(m.get("counts") or {})
    counts.update({k: m[k] for k in _COUNT_KEYS if isinstance(m.get(k), int | float)})
    for key in ("shards", "parts"):
        if isinstance(m.get(key), list):
            counts[key] = len(m[key])
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _throughput(m: dict) -> str:
    rates = {k: v for k, v in m.items() if k.endswith("_per_s") and v is not None}
    timings = m.get("timings") or {}
    total = timings.get("total_s") or timings.get("download_s")
    parts = [f"{v} {k.removesuffix('_per_s').replace('_', ' ')}/s" for k, v in rates.items()]
    if total is not None:
        parts.append(f"{total} s")
    return ", ".join(parts) or "-"


def stage_markdown(name: str, m: dict, *, skipped: bool, output: str, tracking_uri: str,
                   dashboard: str | None, job: str | None, summary: str | None) -> str:  # fmt: skip
    """The markdown artifact of one stage: outcome, counts, throughput, output, MLflow run and Ray links."""
    outcome = "skipped: its output already matches this config and its inputs" if skipped else "done"
    rows = [
        ("outcome", outcome),
        ("counts", _counts(m)),
        ("throughput", _throughput(m)),
        ("output", f"`{output}`"),
        ("MLflow run", mlflow_link(tracking_uri, _mlflow_run(m)) or "-"),
        ("Ray job", job or "- (ran in the flow's process)"),
        ("Ray dashboard", dashboard or "-"),
    ]
    if m.get("registered_model"):
        rows.append(("registered model", json.dumps(m["registered_model"])))
    lines = [f"### {name}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if summary:
        lines += ["", "```", summary, "```"]
    return "\n".join(lines)


def summary_text(name: str, m: dict) -> str | None:
    """The stage's own summary of its manifest (what `ldm stage` prints), or None if it cannot be made."""
    st = stage(name)
    if st.summary is None:
        return None
    try:
        return st.function("summary")(m)
    except Exception:  # noqa: BLE001 - a manifest from an older code version may lack a field; the table stays
        return None


def closing_lines(cfg: PipelineConfig, tracking_uri: str, results: dict[str, Any]) -> str:
    """Where every output is, how to open the MLflow UI on it, and the evaluate stage's sweep table."""
    wd = Workdir.of(cfg)
    lines = ["", "outputs:"]
    lines += [f"  {s.name:<16} {wd.output(s.name)}" for s in STAGES if s.name in results]
    lines += ["", f"MLflow UI: {mlflow_ui_command(tracking_uri)}"]
    evaluate = results.get("evaluate")
    if evaluate:
        table = summary_text("evaluate", evaluate)
        if table:
            lines += ["", table]
    shortened = [budget.summary(name, (m or {}).get("budget")) for name, m in results.items()]
    if any(shortened):  # the figures above come from a shortened run: say so last
        lines += ["", *(line for line in shortened if line)]
    return "\n".join(lines)
