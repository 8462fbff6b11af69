"""results.jsonl and the lookups the summary and plots make in it: the run's file names, the records
(one JSON object a line, `kind` says which) and the measurement rows by job, case and mode."""
import json
from dataclasses import asdict
from pathlib import Path

RESULTS, SUMMARY, ENV, PYTEST_LOG, RUN_LOG = "results.jsonl", "summary.md", "env.json", "pytest.log", "run.log"
KERNELS_PNG, E2E_PNG = "kernels.png", "e2e.png"
OUTPUTS = (RESULTS, SUMMARY, ENV, PYTEST_LOG, RUN_LOG, KERNELS_PNG, E2E_PNG)
OURS = "triton"  # providers whose name starts with this are ours; every other provider is a baseline


class Results:
    """results.jsonl: one JSON object a line, appended and flushed as soon as it exists."""

    def __init__(self, path):
        self.path = Path(path)

    def write(self, kind, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, **record}, default=str) + "\n")

    def read(self) -> list:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                pass
        return records


def row_record(row) -> dict:
    record = asdict(row)
    record.pop("env", None)  # env.json has it once
    return record


def preflight_failures(records) -> dict:
    """{feature: why} for each feature whose preflight row failed."""
    return {r["feature"]: r["error"] for r in records
            if r["kind"] == "preflight" and r.get("feature") and not r["ok"]}


def is_ours(provider):
    return provider.startswith(OURS)


def matches(provider, baseline):
    return provider.startswith(baseline) if baseline.endswith("-") else provider == baseline


def job_reason(records, job):
    """Why a job left no measurement: its skip/kill/crash reason, or its rows' errors."""
    events = [r for r in records if r["kind"] == "job" and r.get("job") == job]
    if not events:
        return "not run yet"
    event = events[-1]
    if event["event"] != "done":
        return f"{event['event']}: {event['reason']}"
    return "its rows have errors or are missing"


class Rows:
    """The measurement rows of results.jsonl, looked up by job, case and mode."""

    def __init__(self, records):
        self.records = records
        self.rows = [r for r in records if r["kind"] == "row"]

    def cases(self, job, op=None):
        return list(dict.fromkeys(r["case"] for r in self.rows
                                  if r["job"] == job and (op is None or r["case"].split()[0] == op)))

    def get(self, case, mode):
        return [r for r in self.rows if r["case"] == case and r["mode"] == mode]

    def ours(self, case, mode):
        mine = [r for r in self.get(case, mode) if r["provider"] == OURS]
        return mine[0] if mine else None

    def best_baseline(self, case, mode, baseline=None):
        """The fastest measured baseline (or of those matching `baseline`), else None."""
        rows = [r for r in self.get(case, mode) if not is_ours(r["provider"]) and r["median_ms"]
                and (baseline is None or matches(r["provider"], baseline))]
        return min(rows, key=lambda r: r["median_ms"]) if rows else None

    def e2e(self, provider):
        rows = [r for r in self.rows if r["stage"] == "e2e" and r["provider"] == provider]
        return rows[-1] if rows else None
