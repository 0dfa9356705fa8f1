"""metrics.csv: its columns (the objective's terms, their validation values, the bookkeeping),
the writer the training loop appends rows with, and the record last.pt keeps of it so that a
resume can tell the history it continues is whole."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
from pathlib import Path

from dlm.core.checkpoint import CheckpointError
from dlm.core.data import append_together, atomic_write_bytes
from dlm.core.errors import DiskFullError, is_disk_full

logger = logging.getLogger("dlm")

# metrics.csv's columns: the objective's `terms` (each family's, "total" first) and their
# validation values between the bookkeeping columns. A file written with other columns (an older
# run's fixed list) keeps them: a resumed run adds its missing ones, never drops any.
RUN_COLUMNS = ("embedding_norm", "nn_distance", "lr", "tokens_per_s", "elapsed_s")


def metric_columns(terms: tuple[str, ...]) -> tuple[str, ...]:
    return ("step", "epoch", *terms, *(f"val_{term}" for term in terms), *RUN_COLUMNS)


# A training write that found the disk full: the run stands at its last checkpoint.
WHEN_FULL = ("Free space on that disk (df -h shows what is left; older checkpoints/epoch_*.pt can go) and continue "
             "the run with --resume: it goes on from checkpoints/last.pt.")


class MetricsError(CheckpointError):
    """metrics.csv does not hold the rows last.pt says were written: resuming would lose history."""


def metrics_record(path: Path) -> dict:
    """What last.pt keeps of metrics.csv when it is written: its rows, length and hash, so a resume can
    tell the history it continues is whole (rows written after the checkpoint are dropped, as the
    steps after it are trained again)."""
    raw = path.read_bytes() if path.exists() else b""
    return {"rows": max(0, raw.count(b"\n") - 1), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def parse_metric_rows(raw: bytes, columns: tuple[str, ...], last_step: int) -> tuple[list[dict], int, bool, list[str]]:
    """The rows of a metrics.csv up to `last_step` that parse (UTF-8, one field per column, an integer
    step, numbers elsewhere), how many lines did not, whether the header did, and the column names
    the rows were read with (a damaged header is read as `columns`)."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    header = lines[0].decode("utf-8", "replace").strip().split(",") if lines else []
    # a header is whole when it names distinct columns, step first (an older run's columns included)
    header_ok = (bool(header) and header[0] == "step" and len(set(header)) == len(header)
                 and all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in header))
    names = header if header_ok else list(columns)
    rows, damaged = [], 0
    for line in lines[1:]:
        try:
            fields = next(csv.reader([line.decode("utf-8")]))
            if len(fields) != len(names):
                raise ValueError("field count")
            row = dict(zip(names, fields))
            step = int(row["step"])
            for value in row.values():
                if value:
                    float(value)
        except (UnicodeDecodeError, ValueError, StopIteration):
            damaged += 1
            continue
        if step <= last_step:
            rows.append(row)
    return rows, damaged, header_ok or not lines, names


class MetricsWriter:
    """metrics.csv, one row per log interval (and one per epoch end, with validation losses); its
    columns are `metric_columns(terms)`, after those of an existing file."""

    def __init__(self, path: Path, keep_until_step: int | None = None, recorded: dict | None = None,
                 rebuild: bool = False, fresh: bool = False, terms: tuple[str, ...] = ("total",)):
        """A new file (or, `fresh`, one that replaces a run stopped before its first checkpoint), or on
        resume the rows up to `keep_until_step` checked against last.pt's `recorded` metrics_record.
        An existing file keeps its columns (an older run's fixed list); the objective's missing ones are added."""
        self.path = path
        self.columns = metric_columns(terms)
        if keep_until_step is not None:
            self._resume(keep_until_step, recorded, rebuild)
        elif fresh or not path.exists():
            self._rewrite([])
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows, header = list(reader), list(reader.fieldnames or [])
        missing = [c for c in self.columns if c not in header]
        self.columns = (*header, *missing)
        if missing:
            self._rewrite(rows)

    def _resume(self, step: int, recorded: dict | None, rebuild: bool) -> None:
        """Keep the rows up to the checkpoint's step, after checking they are the ones written."""
        raw = self.path.read_bytes() if self.path.exists() else b""
        if recorded is not None:
            kept = raw[:recorded["bytes"]]
            if len(raw) >= recorded["bytes"] and hashlib.sha256(kept).hexdigest() == recorded["sha256"]:
                atomic_write_bytes(self.path, kept)  # whole: the rows after the checkpoint are dropped
                return
        rows, damaged, header_ok, names = parse_metric_rows(raw, self.columns, step)
        self.columns = (*names, *[c for c in self.columns if c not in names])
        if recorded is None and not damaged and header_ok:
            self._rewrite(rows)  # a checkpoint from before the record: the rows that parse are all it can check
            return
        expected = recorded["rows"] if recorded is not None else len(rows) + damaged
        lost = max(expected - len(rows), damaged)
        if rebuild:
            self._rewrite(rows)
            logger.warning("rebuilt '%s' from the %d row(s) up to step %d that parse; %d of the %d written were "
                           "lost or damaged", self.path, len(rows), step, lost, expected)
            return
        if not self.path.exists():
            found = "is missing"
        else:
            found = f"has {len(rows)} readable row(s) up to step {step} of the {expected} checkpoints/last.pt recorded"
            found += "".join(f", {what}" for what, seen in ((f"{damaged} damaged line(s)", damaged),
                                                             ("a damaged header", not header_ok),
                                                             ("changed values", not lost and header_ok)) if seen)
        raise MetricsError(
            f"'{self.path}' {found}: resuming would lose the run's history. Restore it from a copy, or resume "
            f"with --rebuild_metrics (rebuild_metrics=True in train.ipynb) to rebuild it from the rows that parse.")

    def _rewrite(self, rows: list[dict]) -> None:
        lines = [",".join(self.columns)] + [",".join(str(r.get(c) or "") for c in self.columns) for r in rows]
        atomic_write_bytes(self.path, ("\n".join(lines) + "\n").encode())

    def write(self, row: dict) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:  # a term the objective did not declare would be lost: say so instead
            raise ValueError(f"metrics.csv has no column for {', '.join(sorted(unknown))}; "
                             f"the objective's `terms` must name every loss it returns.")
        line = io.StringIO(newline="")
        csv.DictWriter(line, self.columns).writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                                                     for k, v in row.items()})
        with open(self.path, "ab", buffering=0) as handle:
            try:  # a row is written whole or not at all: a cut last row would block the resume
                append_together([(handle, line.getvalue().encode("utf-8"))])
            except OSError as error:
                if not is_disk_full(error):
                    raise
                raise DiskFullError(self.path, what=WHEN_FULL) from None

    def record(self) -> dict:
        return metrics_record(self.path)
