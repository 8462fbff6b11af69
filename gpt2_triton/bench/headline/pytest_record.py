"""The pytest job: `pytest -m gpu` with a plugin that writes each outcome to results.jsonl and stops at the
deadline, and the summary's paragraph on what it found."""
import time

from gpt2_triton.bench.headline.records import job_reason


def pytest_job(ctx):
    """`pytest -m gpu` over the whole tests folder: the marker chooses the tests. A module that fails to
    import is a failure with its message (collection goes on past it); one that needs a declared
    dependency this machine lacks is skipped with that reason (tests/conftest.py)."""
    import pytest
    rc = pytest.main(["-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                      str(ctx.tests)], plugins=[_PytestRecorder(ctx)])
    ctx.write("pytest-exit", rc=int(rc))


class _PytestRecorder:
    """pytest plugin: GPT-2-sized tests first, each outcome to results.jsonl, stop at the deadline."""

    def __init__(self, ctx):  # the job's JobContext
        self.ctx = ctx
        self.session = None

    def pytest_sessionstart(self, session):
        self.session = session

    def pytest_collection_modifyitems(self, items):
        items.sort(key=lambda item: "gpt2_size" not in item.name)  # stable: keeps the order otherwise

    def pytest_collection_finish(self, session):
        self.ctx.write("collected", tests=[item.nodeid for item in session.items])

    def pytest_collectreport(self, report):
        """A module that failed to import is a failed row with its error; one skipped whole (a missing
        declared dependency) a skipped row with the reason."""
        if report.failed or report.skipped:
            self.ctx.write("test", test=report.nodeid, outcome="failed" if report.failed else "skipped",
                           when="collect", duration_s=0.0, message=_pytest_message(report))

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.ctx.write("test", test=report.nodeid, outcome=report.outcome, when=report.when,
                           duration_s=round(report.duration, 2), message=_pytest_message(report))

    def pytest_runtest_logfinish(self, nodeid, location):
        if time.monotonic() > self.ctx.deadline and self.session is not None and not self.session.shouldstop:
            self.session.shouldstop = "bench headline: the pytest time cap was reached"
            self.ctx.write("pytest-stop", reason="the time cap was reached")


def _pytest_message(report) -> str:
    if report.outcome == "passed":
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    lines = str(report.longreprtext).splitlines()
    errors = [line for line in lines if line.startswith("E ")]
    return "\n".join(errors[:6] or [line for line in lines if line.strip()][-3:])[:600]


def pytest_text(records):
    pytest_records = [r for r in records if r.get("stage") == "pytest"]
    collected = next((r["tests"] for r in pytest_records if r["kind"] == "collected"), None)
    tests = [r for r in pytest_records if r["kind"] == "test" and r["when"] != "collect"]
    modules = [r for r in pytest_records if r["kind"] == "test" and r["when"] == "collect"]
    job = [r for r in records if r["kind"] == "job" and r.get("job") == "pytest"]
    if collected is None:
        return f"Not run: {job_reason(records, 'pytest')}." if job else "Not run yet."
    outcome = {}
    for t in tests:  # a failing teardown after a passing call counts as failed
        if outcome.get(t["test"]) != "failed":
            outcome[t["test"]] = t["outcome"]
    counts = {k: sum(v == k for v in outcome.values()) for k in ("passed", "failed", "skipped")}
    not_run = len([t for t in collected if t not in outcome])
    text = (f"{len(collected)} `gpu` tests collected: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped, {not_run} not run")
    exit_rc = next((r["rc"] for r in pytest_records if r["kind"] == "pytest-exit"), None)
    if not_run:
        capped = any(r["kind"] == "pytest-stop" for r in pytest_records)
        why = ("the time cap was reached" if capped else job_reason(records, "pytest") if exit_rc is None
               else f"pytest exited with code {exit_rc}")
        text += f" ({why})"
    broken = [m for m in modules if m["outcome"] == "failed"]
    if broken:
        text += f"; {len(broken)} test module{'s' if len(broken) > 1 else ''} did not import"
    lines = [text + "."]
    skipped = {t["message"] for t in tests if t["outcome"] == "skipped"}
    if skipped:
        lines.append("Skip reasons: " + "; ".join(sorted(skipped)) + ".")
    skipped_modules = [m for m in modules if m["outcome"] == "skipped"]
    if skipped_modules:
        lines.append("Test modules skipped whole: " + "; ".join(f"`{m['test']}` ({m['message']})"
                                                               for m in skipped_modules) + ".")
    for t in broken + [t for t in tests if t["outcome"] == "failed"]:
        lines.append(f"- FAILED `{t['test']}` ({t['when']}): " + t["message"].replace("\n", " ")[:300])
    return "\n".join(lines)
