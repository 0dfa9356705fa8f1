"""How long each preset trained, read from its run folders: the one place README's preset table
takes its training times from (tests/test_docs.py checks that every time there is a row here).

    python benchmarks/preset_times.py default.yaml=reports/reference/run masked.yaml=reports/masked/run \\
        masked_blocks4.yaml=runs/masked_blocks4 [--note "masked_blocks4.yaml=1 thread beside other jobs"]

Each PRESET=RUN names a preset of params/ and a run trained from it. A row gives the optimizer steps,
the seconds the run spent training (metrics.csv's clock, summed over resumed invocations: the
train page's number), the precision, threads and processes of its last invocation, and the machine
(provenance.json's CPU model and instruction sets; "not recorded" for runs made before it was kept).
Rows already in --out for other (preset, run) pairs are kept, so the table grows run by run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from dlm.runs.provenance import read_provenance
from dlm.runs.rundir import RunDir
from dlm.workbench.workbook import training_seconds

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["preset", "run", "steps", "train_s", "train_min", "precision", "threads", "processes", "cpu", "flags",
           "date", "note"]


def report_invocations(run_dir: Path) -> list[dict]:
    """A report's run without its own provenance.json: the copy its report.json keeps."""
    try:
        return json.loads((run_dir.parent / "report.json").read_text())["provenance"]["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def time_row(preset: str, run_dir: Path, note: str = "") -> dict:
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise SystemExit(f"preset_times.py: error: '{run_dir}' holds no metrics.csv: train the preset into it first.")
    invocations = read_provenance(run.provenance) or report_invocations(run_dir)
    metrics = pd.read_csv(run.metrics)
    seconds = training_seconds(metrics, invocations)
    last = invocations[-1] if invocations else {}
    machine = last.get("machine") or {}
    config = last.get("config") or {}
    return {"preset": preset, "run": str(run_dir), "steps": int(metrics["step"].max()),
            "train_s": None if seconds is None else round(seconds, 1),
            "train_min": None if seconds is None else round(seconds / 60, 1),
            "precision": last.get("precision", "not recorded"), "threads": config.get("threads") or "torch's choice",
            "processes": last.get("processes", 1), "cpu": machine.get("cpu", "not recorded"),
            "flags": " ".join(machine.get("flags", [])) if machine else "not recorded",
            "date": (last.get("started") or "")[:10], "note": note}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="PRESET=RUN")
    parser.add_argument("--note", action="append", default=[], metavar="PRESET=TEXT",
                        help="a word on how the time was taken (load, threads), shown beside it")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "preset_times.csv"))
    args = parser.parse_args(argv)
    notes = dict(item.split("=", 1) for item in args.note)
    rows = []
    for item in args.runs:
        preset, sep, run = item.partition("=")
        if not sep or not (ROOT / "params" / preset).is_file():
            raise SystemExit(f"preset_times.py: error: '{item}' must be PRESET=RUN with PRESET a file of params/.")
        rows.append(time_row(preset, Path(run), notes.get(preset, "")))
    out = Path(args.out)
    table = pd.DataFrame(rows, columns=COLUMNS)
    if out.is_file():
        kept = pd.read_csv(out)
        mine = set(zip(table["preset"], table["run"]))
        table = pd.concat([kept[[(p, r) not in mine for p, r in zip(kept["preset"], kept["run"])]], table])
    table = table.sort_values(["preset", "date"])
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    out.with_suffix(".md").write_text(table.to_markdown(index=False) + "\n")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
