"""Grade the bad-input table of tests/bad_inputs.py on a checkout of sdo and count the verdicts (clear, vague,
traceback, silent, lost), so that a change's before and after are measured on the same table.

    python benchmarks/bad_inputs_survey.py --label after --output benchmarks/results/bad_inputs
    git worktree add /tmp/sdo-before <commit>
    PYTHONPATH=/tmp/sdo-before/src python benchmarks/bad_inputs_survey.py --label before \\
        --output benchmarks/results/bad_inputs
    python benchmarks/bad_inputs_survey.py --report --output benchmarks/results/bad_inputs

Each case runs in this process with a time limit (``--timeout``): a case still working when it rings took the bad
input and computed with it, so it counts as silent. A case that changed a pre-existing file (lost) is followed by
restoring the world from a pristine copy, so that later cases see the same files.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bad_inputs import CASES, VERDICTS, World, run_case


def survey(label: str, timeout: int) -> dict:
    import sdo

    root = Path(tempfile.mkdtemp(prefix="sdo-bad-inputs-"))
    try:
        world = World(root)
        pristine = root / "pristine"
        shutil.copytree(world.root, pristine)
        rows, began = [], time.perf_counter()
        for n, case in enumerate(CASES, 1):
            start = time.perf_counter()
            verdict, detail = run_case(case, world, timeout=timeout)
            if verdict == "lost":
                shutil.rmtree(world.root)
                shutil.copytree(pristine, world.root)
            rows.append({"id": case.id, "verdict": verdict, "seconds": round(time.perf_counter() - start, 2),
                         "detail": detail.replace(str(root), "<tmp>")[-400:]})
            print(f"[{n}/{len(CASES)}] {verdict:9} {case.id}", file=sys.stderr, flush=True)
        counts = collections.Counter(r["verdict"] for r in rows)
        return {"label": label, "sdo": str(Path(sdo.__file__).parent), "timeout": timeout,
                "seconds": round(time.perf_counter() - began, 1), "cases": len(rows),
                "counts": {v: counts.get(v, 0) for v in VERDICTS}, "rows": rows}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(folder: Path) -> str:
    """results.md: the counts of every survey in ``folder``, and the cases whose verdict differs between them."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    runs.sort(key=lambda r: (r["label"] != "before", r["label"]))
    lines = ["# Bad inputs: verdicts by survey", "",
             "Command: `python benchmarks/bad_inputs_survey.py` (see its docstring); the table is tests/bad_inputs.py.",
             "", "| survey | cases | " + " | ".join(VERDICTS) + " | seconds |",
             "| --- | --- | " + " | ".join("---" for _ in VERDICTS) + " | --- |"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['cases']} | " + " | ".join(str(r["counts"][v]) for v in VERDICTS)
                     + f" | {r['seconds']} |")
    if len(runs) >= 2:
        first, last = ({row["id"]: row for row in r["rows"]} for r in (runs[0], runs[-1]))
        lines += ["", f"## Each case: {runs[0]['label']} -> {runs[-1]['label']}", "",
                  f"| case | {runs[0]['label']} | {runs[-1]['label']} | {runs[0]['label']}: what happened |",
                  "| --- | --- | --- | --- |"]
        for case_id, row in last.items():
            before = first.get(case_id, {"verdict": "-", "detail": ""})
            detail = before["detail"].replace("|", "\\|").replace("\n", " ")[-160:]
            lines.append(f"| {case_id} | {before['verdict']} | {row['verdict']} | {detail} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="results folder (one <label>.json per survey)")
    parser.add_argument("--label", default="after", help="name of this survey, e.g. before or after (default after)")
    parser.add_argument("--timeout", type=int, default=30, help="seconds a case may work before it counts as silent "
                        "(default 30)")
    parser.add_argument("--report", action="store_true", help="only (re)write results.md from the surveys there")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier survey of the same label")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    if not args.report:
        target = args.output / f"{args.label}.json"
        if target.exists() and not args.overwrite:
            parser.error(f"{target} exists; pass --overwrite to replace it")
        result = survey(args.label, args.timeout)
        target.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: result[k] for k in ("label", "cases", "counts", "seconds")}))
    (args.output / "results.md").write_text(report(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
