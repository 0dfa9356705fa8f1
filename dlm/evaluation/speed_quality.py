"""Sample quality against sampling cost (issue 35's Pareto table): which sampler settings a row
takes, which rows no other row beats on both quality and cost, and which meet the race against the
cached AR model. The measuring is benchmarks/pareto.py's; this is the part that decides, tested
on tables made by hand."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dlm.core.errors import UserError

# cost columns of the table: CPU seconds per sample in a batch of 64, and one sample alone (wall)
COSTS = {"cpu_s_per_sample": "CPU seconds per sample (batch of 64)",
         "batch1_s": "wall seconds of one sample alone (batch of 1)"}


@dataclass(frozen=True)
class Setting:
    """One way to sample a run: a masked sampler (None: the run's own) and its steps (None: the
    run's own; a block run's are a block's)."""

    sampler: str | None = None
    steps: int | None = None

    def label(self) -> str:
        if self.sampler is None and self.steps is None:
            return "its own"
        return ":".join(str(part) for part in (self.sampler, self.steps) if part is not None)


def parse_settings(text: str) -> list[Setting]:
    """'grid:10,first_hitting,confidence:4' or '10,50' (steps alone) as Settings; '' as the run's own.
    An item is SAMPLER, SAMPLER:STEPS or STEPS, with STEPS a positive integer."""
    if not text.strip():
        return [Setting()]
    settings = []
    for item in text.split(","):
        sampler, _, steps = item.strip().rpartition(":") if ":" in item else ("", "", item.strip())
        if not steps.isdigit() and not sampler:  # a sampler alone
            sampler, steps = steps, ""
        if (steps and not steps.isdigit()) or (steps and int(steps) < 1) or not (sampler or steps):
            raise UserError(f"'{item.strip()}' is not SAMPLER, SAMPLER:STEPS or STEPS (a positive integer), "
                            "e.g. grid:10,first_hitting,confidence:4.")
        settings.append(Setting(sampler or None, int(steps) if steps else None))
    return settings


def frontier(table: pd.DataFrame, cost: str, quality: str = "teacher_ppl") -> pd.Series:
    """Whether each row is on the Pareto frontier of (cost, quality), both lower-better: no other row
    is at most as costly and at most as perplexing, and strictly better in one. Rows missing either
    number are not on it."""
    known = table[cost].notna() & table[quality].notna()
    on = pd.Series(False, index=table.index)
    for index in table.index[known]:
        c, q = table.at[index, cost], table.at[index, quality]
        others = table[known & (table.index != index)]
        beaten = ((others[cost] <= c) & (others[quality] <= q) & ((others[cost] < c) | (others[quality] < q))).any()
        on[index] = not beaten
    return on


def race(table: pd.DataFrame, ar_row: str, heldout_ppl: float) -> pd.DataFrame:
    """Issue 35's target for each diffusion row, against the cached AR row named `ar_row`: its
    teacher perplexity within the AR's own seed spread (at most its highest) or below held-out
    text's, and at most the AR's cost in a batch of 64 (cpu_s_per_sample) and alone (batch1_s).
    Adds quality_ok, batch64_ok and batch1_ok (the AR's own row: empty)."""
    if ar_row not in set(table["row"]):
        raise UserError(f"the table has no row '{ar_row}' to race against.")
    ar = table[table["row"] == ar_row].iloc[0]
    table = table.copy()
    contender = table["row"] != ar_row
    bar = max(ar["ppl_max"], heldout_ppl)
    quality_ok = table["teacher_ppl"] <= bar
    for column, ok in (("quality_ok", quality_ok),
                       ("batch64_ok", quality_ok & (table["cpu_s_per_sample"] <= ar["cpu_s_per_sample"])),
                       ("batch1_ok", quality_ok & (table["batch1_s"] <= ar["batch1_s"]))):
        table[column] = ok.where(contender, other=pd.NA)
    return table
