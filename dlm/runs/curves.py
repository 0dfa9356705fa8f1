"""TensorBoard event files for a run (`tensorboard: true`, `dlm train --tensorboard`): losses, lr,
tokens/s, the embedding table's geometry, validation losses, a few decoded samples at each kept
checkpoint and the NLL bound when it is computed over checkpoints, written to RUN/tensorboard/ by
torch's SummaryWriter, so `tensorboard --logdir runs` shows every run side by side.

Optional: the `tensorboard` package (pip install 'dlm[tensorboard]') is imported only when a run
asks for curves; metrics.csv stays the record every other tool reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch

from dlm.core.config import ConfigError
from dlm.core.data import try_writing_in
from dlm.core.embeddings import nearest_neighbour_distances
from dlm.core.errors import UserError
from dlm.runs.rundir import RunDir

SAMPLES_SHOWN = 4  # decoded samples written at each kept checkpoint
SAMPLE_STEPS = 50  # at most this many reverse steps for them (logsnr spacing samples well at 50)


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def check_available() -> None:
    """Before any work: a run that asks for curves needs the tensorboard package."""
    if not available():
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install -e '.[tensorboard]'), or train without --tensorboard.")


def check_folder(run_dir: str | Path) -> None:
    """Before any work (before the run folder is made): RUN/tensorboard can be made and written."""
    folder = RunDir(run_dir).tensorboard
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--tensorboard writes its event files to '{folder}', which is a file: move that file "
                          f"away, or train without --tensorboard.")
    try:
        try_writing_in(folder, "events.out.tfevents", folder, "--tensorboard's folder", "run folder")
    except UserError as error:
        raise ConfigError(f"{str(error).removesuffix('.')}, or train without --tensorboard.") from None


class Curves:
    """One run's event files. `purge_step`: a resumed run's first step, so that TensorBoard drops
    what an earlier invocation wrote from there on (the steps are trained again)."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(RunDir(run_dir).tensorboard), purge_step=purge_step)

    def log_row(self, row: dict, terms: Iterable[str]) -> None:
        """A metrics.csv log row: every loss term, lr, tokens/s, mean row norm, nearest-neighbour distance."""
        step = row["step"]
        for term in terms:
            self.writer.add_scalar(f"loss/{term}", row[term], step)
        for tag, key in (("lr", "lr"), ("speed/tokens_per_s", "tokens_per_s"),
                         ("embedding/mean_norm", "embedding_norm"), ("embedding/nn_distance", "nn_distance")):
            self.writer.add_scalar(tag, row[key], step)

    def log_validation(self, step: int, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            self.writer.add_scalar(f"val/{name.removeprefix('val_')}", value, step)

    @torch.no_grad()
    def log_table(self, step: int, table: torch.Tensor, max_rows: int = 2048) -> None:
        """The embedding table's geometry as histograms: row norms and nearest-neighbour distances."""
        table = table.detach().float().cpu()
        self.writer.add_histogram("embedding/row_norms", table.norm(dim=-1), step)
        self.writer.add_histogram("embedding/nn_distances", nearest_neighbour_distances(table, rows=max_rows), step)

    def log_samples(self, step: int, texts: list[str]) -> None:
        # TensorBoard renders text as markdown: an indented block keeps line breaks and punctuation as they are
        blocks = ["\n".join("    " + line for line in text.split("\n")) for text in texts]
        self.writer.add_text("samples", "\n\n---\n\n".join(blocks), step)

    def log_nll_bounds(self, rows: Iterable[dict]) -> None:
        """The likelihood bound over checkpoints (nats/token), one point per checkpoint's step."""
        for row in rows:
            self.writer.add_scalar("nll/bound", row["nll_bound"], row["step"])
            self.writer.add_scalar("nll/bound_se", row["nll_bound_se"], row["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()
