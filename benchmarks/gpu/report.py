"""The markdown table of a GPU run, rewritten after every step (OUT/<plan>.md)."""

from __future__ import annotations

from typing import Any


def cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


def markdown(
    start: dict[str, Any], records: list[dict[str, Any]], end: dict[str, Any] | None
) -> str:
    """A summary line per step, then each step's rows (one table per `part`), checks and notes."""
    device = next((r["rows"][0] for r in records if r["name"] == "versions" and r["rows"]), {})
    lines = [
        f"# powergrad GPU run `{start['plan']}`: {device.get('device', '?')}",
        "",
        f"Started {start['started_utc']} UTC; `{start['command']}`; limit {start['time_limit_s']:.0f} s; "
        f"data {start['data'] or 'generated'}"
        + (
            "; **dry run: tiny sizes on the CPU, no figure here is a GPU result**"
            if start["dry_run"]
            else ""
        )
        + (
            f"; finished in {end['seconds']:.0f} s, exit {end['exit_code']}"
            + (f" (stopped by {end['stopped_by']})" if end.get("stopped_by") else "")
            if end
            else "; **still running, or cut off**"
        ),
        "",
        "| step | status | seconds (limit) | checks passed | failed | targets missed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        passed = sum(c["ok"] is True for c in r["checks"])
        failed = [c["name"] for c in r["checks"] if c["ok"] is False and c["kind"] == "correctness"]
        missed = [c["name"] for c in r["checks"] if c["ok"] is False and c["kind"] == "target"]
        lines.append(
            f"| {r['name']} | {r['status']} | {r['seconds']:.0f} ({r['budget_s']:.0f}) | {passed} | "
            f"{cell('; '.join(failed))} | {cell('; '.join(missed))} |"
        )
    for r in records:
        lines += ["", f"## {r['name']}: {r['status']}", "", r["what"], ""]
        for part in dict.fromkeys(row.get("part") for row in r["rows"]):
            rows = [row for row in r["rows"] if row.get("part") == part]
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
            lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
            lines.append("")
        for c in r["checks"]:
            mark = {True: "PASS", False: "FAIL" if c["kind"] == "correctness" else "MISSED"}
            lines.append(
                f"- {mark.get(c['ok'], 'not judged')} ({c['kind']}): {c['name']}"
                + (f": {c['detail']}" if c["detail"] else "")
            )
        lines += [f"- note: {n}" for n in r["notes"]]
        if r.get("error"):
            lines += ["", "```", r["error"].strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"
