"""Reading a run directory's ``metrics.jsonl`` (docs/design.md, Run directory): the JSON lines, then one
merged record per step. Standard library only, so that the report (no torch) and the benchmark
scripts (no matplotlib) read the file the same way.
"""
from __future__ import annotations

import json
from typing import List

METRICS_FILE = "metrics.jsonl"


def read_jsonl(path: str, warnings: List[str]) -> list:
    """The JSON values of a .jsonl file, in order; malformed lines (e.g. the half-written last line
    of a run that is still going) are skipped with a warning."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.append(f"{path}:{lineno}: skipped a malformed line")
    return out


def merge_by_step(records: list, warnings: List[str], source: str) -> List[dict]:
    """One record per step, in step order (``step`` made an int). Several records of one step are
    merged, later keys winning: a resumed run re-logs steps (the new values replace the old), and a
    writer may log evaluation results separately. Records without a numeric ``step`` are skipped with
    a warning naming ``source``."""
    by_step = {}
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            warnings.append(f"{source}: skipped a record without an integer 'step'")
            continue
        rec = dict(rec)
        rec["step"] = int(rec["step"])
        by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]
