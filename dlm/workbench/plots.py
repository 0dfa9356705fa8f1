"""Matplotlib figures for the notebooks: loss curves, training dynamics, token distributions,
collapse signals over training and embedding geometry.

Every function returns a `matplotlib.figure.Figure` built without pyplot, so no global figure
state leaks between cells and any backend (inline in a notebook, Agg in tests) can render it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from dlm.core.textstats import content_tokens, punctuation_share
from dlm.evaluation.tokens import rank_frequency, top_tokens
from dlm.workbench.notebook import LIVE_MARK

DPI = 90
HELDOUT_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.2}


def token_label(token: str) -> str:
    """A token as plot text: newlines visible, '$' not read as mathtext."""
    return repr(token)[1:-1].replace("$", r"\$") if token.strip() else repr(token)


def _figure(rows: int, cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.ticklabel_format(useOffset=False)  # '3.9321' rather than '+3.93e0' offsets on flat curves
    return figure, axes


# A quantity whose values spread less than this, relative to their size, is held constant by the
# recipe (an L2-normalised table's row norms): plotted, its axis would span floating-point noise.
CONSTANT_SPREAD = 1e-5


def constant_value(values: Sequence[float]) -> float | None:
    """The value of a quantity that does not vary beyond floating-point noise (at least two finite
    values whose max - min is below CONSTANT_SPREAD of their mean's size), else None."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size < 2:
        return None
    centre = float(finite.mean())
    return centre if np.ptp(finite) <= CONSTANT_SPREAD * abs(centre) else None


def constant_line(name: str, value: float) -> str:
    return f"{name}: {value:.6g} throughout (the recipe holds it constant; not plotted)"


def _say_instead(ax, line: str) -> None:
    """An axes that would plot a constant shows the one line that says so instead."""
    ax.axis("off")
    ax.text(0.5, 0.5, line, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)


def _log_if_positive(ax, values: Sequence[float]) -> None:
    values = [v for v in values if v == v]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")


def _legend(ax, **options) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)




def loss_terms(metrics: pd.DataFrame) -> list[str]:
    """The loss terms a metrics.csv holds values of, in its column order ("total" first)."""
    return [c for c in metrics.columns if f"val_{c}" in metrics.columns and metrics[c].notna().any()]


def loss_curves(metrics: pd.DataFrame, titles: Mapping[str, str] | None = None) -> Figure:
    """The run's first three loss terms (for the Gaussian family total, diffusion MSE and rounding
    CE), train and validation, against steps; `titles`: each term's plot title, the family's own
    (dlm.workbench.captions.term_titles; a term without one is titled by its name)."""
    terms = loss_terms(metrics)[:3] or ["total"]
    figure, axes = _figure(1, len(terms), 13 * len(terms) / 3, 3.6)
    train = metrics[metrics["total"].notna()] if "total" in metrics else metrics.iloc[0:0]
    val = metrics[metrics["val_total"].notna()] if "val_total" in metrics else metrics.iloc[0:0]
    for ax, term in zip(axes[0], terms):
        title = "total loss" if term == "total" else (titles or {}).get(term, term)
        if len(train):  # a lone point (the first log line) gets a marker: a line through one point draws nothing
            ax.plot(train["step"], train[term], label="train", color="C0", marker="o" if len(train) == 1 else None,
                    markersize=4)
        if len(val):
            ax.plot(val["step"], val[f"val_{term}"], "o-", label="validation", color="C1", markersize=3)
        _log_if_positive(ax, [*train.get(term, []), *val.get(f"val_{term}", [])])
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8)
    return figure


def has_a_point(metrics: pd.DataFrame) -> bool:
    """Whether loss_curves would draw anything: a finite training or validation total."""
    columns = [c for c in ("total", "val_total") if c in metrics]
    return bool(len(metrics)) and any(np.isfinite(metrics[c].astype(float)).any() for c in columns)


class LiveLossCurves:
    """The loss curves redrawn in place while a run trains: one figure in one output, updated (an
    IPython display handle) each time train() writes a metrics.csv row, i.e. every log_every steps
    and at each validation. Pass it as train(..., on_metrics=...). `show` is IPython's display;
    `titles` the terms' plot titles (loss_curves)."""

    def __init__(self, metrics_path: str | Path, show=None, titles: Mapping[str, str] | None = None):
        self.metrics_path = Path(metrics_path)
        self.show = show
        self.titles = titles
        self.handle = None
        self.redraws = 0

    def __call__(self, row: dict | None = None) -> None:
        metrics = pd.read_csv(self.metrics_path)  # the whole run so far, resumed rows too
        if not has_a_point(metrics):
            return  # the first frame waits for a value to draw: empty axes would read as a broken plot
        figure = loss_curves(metrics, self.titles)
        metadata = {LIVE_MARK: True}
        if self.handle is None:
            if self.show is None:
                from IPython.display import display as show
            else:
                show = self.show
            self.handle = show(figure, display_id=True, metadata=metadata)
        else:
            self.handle.update(figure, metadata=metadata)
            self.redraws += 1


def nll_over_training(bounds: pd.DataFrame, metrics: pd.DataFrame, ar_nll: float | None = None) -> Figure:
    """The likelihood bound at each checkpoint (nats per token, +- 2 standard errors) next to the
    validation loss, against steps (`dlm.evaluation.likelihood.bound_over_checkpoints`)."""
    figure, axes = _figure(1, 2, 11, 3.6)
    bound_ax, loss_ax = axes[0]
    if len(bounds):
        bound_ax.errorbar(bounds["step"], bounds["nll_bound"], yerr=2 * bounds["nll_bound_se"], fmt="o-",
                          color="C2", markersize=4, capsize=3, label="bound (+- 2 SE)")
    if ar_nll is not None:
        bound_ax.axhline(ar_nll, **HELDOUT_STYLE, label="AR baseline (exact)")
    bound_ax.set_title("NLL bound on held-out windows (nats / token)")
    val = metrics[metrics["val_total"].notna()] if "val_total" in metrics else metrics.iloc[0:0]
    if len(val):
        loss_ax.plot(val["step"], val["val_total"], "o-", color="C1", markersize=3, label="validation loss")
    loss_ax.set_title("validation loss (the training objective)")
    for ax in (bound_ax, loss_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8)
    return figure


def training_curves(metrics: pd.DataFrame, sigma0: float | None = None) -> Figure:
    """Embedding norm, nearest-neighbour distance (against sigma0), learning rate and tokens/s."""
    figure, axes = _figure(1, 4, 15, 3.4)
    rows = metrics[metrics["embedding_norm"].notna()] if "embedding_norm" in metrics else metrics.iloc[0:0]
    panels = [("embedding_norm", "mean embedding norm"), ("nn_distance", "nearest-neighbour distance"),
              ("lr", "learning rate"), ("tokens_per_s", "tokens / s")]
    for ax, (column, title) in zip(axes[0], panels):
        constant = constant_value(rows[column]) if column == "embedding_norm" and len(rows) else None
        if constant is not None:
            _say_instead(ax, constant_line(title, constant))
            continue
        if len(rows):
            ax.plot(rows["step"], rows[column], color="C0")
        if column == "nn_distance" and sigma0:
            ax.axhline(sigma0, **HELDOUT_STYLE, label="sigma0 (noise of q(x0|w))")
            _legend(ax, fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    return figure


def token_distribution(series: Mapping[str, Sequence[Sequence[str]]], top: int = 15) -> Figure:
    """Token distributions of several token streams (samples, held-out text, ...): the most frequent
    tokens' shares, the punctuation share and the rank-frequency curve."""
    figure, axes = _figure(1, 3, 15, 4.2)
    names = list(series)
    # The top tokens of the first stream, then any other stream's top tokens, in one shared order.
    order: list[str] = []
    for name in names:
        for token, _ in top_tokens(series[name], top):
            if token not in order and len(order) < top + 5:
                order.append(token)
    width = 0.8 / max(1, len(names))
    positions = np.arange(len(order))
    bars, punct, ranks = axes[0]
    for k, name in enumerate(names):
        tokens = content_tokens(series[name])
        total = max(1, len(tokens))
        counts = pd.Series(tokens).value_counts() if tokens else pd.Series(dtype=int)
        bars.bar(positions + k * width, [counts.get(t, 0) / total for t in order], width, label=name)
        punct.bar(k, punctuation_share(tokens), color=f"C{k}")
        frequencies = rank_frequency(series[name])
        if frequencies:
            ranks.loglog(range(1, len(frequencies) + 1), np.array(frequencies) / sum(frequencies), label=name)
    bars.set_xticks(positions + width * (len(names) - 1) / 2, [token_label(t) for t in order], rotation=60, fontsize=8)
    bars.set_title("most frequent tokens (share of all tokens)")
    _legend(bars, fontsize=8)
    punct.set_xticks(range(len(names)), names, rotation=20)
    punct.set_title("punctuation share")
    punct.set_ylim(0, 1)
    ranks.set_title("rank-frequency")
    ranks.set_xlabel("rank")
    ranks.set_ylabel("share")
    _legend(ranks, fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return figure


def collapse_over_training(series: pd.DataFrame, heldout: Mapping[str, Mapping[str, float]]) -> Figure:
    """Sample statistics at each analysed checkpoint, one line per run, held-out text dashed."""
    figure, axes = _figure(1, 4, 16, 3.6)
    panels = [("punctuation_share", "punctuation share"), ("unigram_entropy", "unigram entropy (bits)"),
              ("distinct_2", "distinct-2 (distinct-1 dotted)"), ("top10_share", "top-10 share (top-1 dotted)")]
    for k, (run, rows) in enumerate(series.groupby("run", sort=False)):
        color = f"C{k}"
        for ax, (column, _) in zip(axes[0], panels):
            ax.plot(rows["epoch"], rows[column], "o-", color=color, label=str(run))
            if column in heldout.get(run, {}):
                ax.axhline(heldout[run][column], color=color, linestyle="--", linewidth=1, alpha=0.7)
        axes[0][2].plot(rows["epoch"], rows["distinct_1"], "o:", color=color)
        axes[0][3].plot(rows["epoch"], rows["top1_share"], "o:", color=color)
    for ax, (_, title) in zip(axes[0], panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="run (dashed: held-out)", title_fontsize=8)
    return figure


def geometry_over_training(series: pd.DataFrame) -> Figure:
    """Mean embedding norm and nearest-neighbour distance against sigma0 at each checkpoint."""
    figure, axes = _figure(1, 2, 10, 3.4)
    norms, distances = axes[0]
    runs = list(series.groupby("run", sort=False))
    constants = [constant_value(rows["embedding_norm"]) for _, rows in runs]
    for k, (run, rows) in enumerate(runs):
        norms.plot(rows["epoch"], rows["embedding_norm"], "o-", color=f"C{k}", label=str(run))
        distances.plot(rows["epoch"], rows["nn_distance"], "o-", color=f"C{k}", label=f"{run}: nn distance")
        distances.axhline(float(rows["sigma0"].iloc[0]), color=f"C{k}", linestyle="--", linewidth=1,
                          label=f"{run}: sigma0")
    norms.set_title("mean embedding norm")
    distances.set_title("nearest-neighbour distance vs sigma0")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if runs and all(c is not None for c in constants):
        norms.clear()
        _say_instead(norms, "; ".join(constant_line(f"mean embedding norm ({run})" if len(runs) > 1 else
                                                    "mean embedding norm", c) for (run, _), c in zip(runs, constants)))
    return figure


def _seen(geometry: pd.DataFrame) -> pd.DataFrame:
    return geometry[geometry["count"] > 0]


def embedding_geometry(geometries: Mapping[str, pd.DataFrame], sigma0: float) -> Figure:
    """Per token, against its training count: row norm (top) and nearest-neighbour distance with
    sigma0 (bottom); one column per checkpoint, punctuation in red."""
    cols = max(1, len(geometries))
    constants = {label: constant_value(_seen(geometry)["norm"]) for label, geometry in geometries.items()}
    held = bool(constants) and all(c is not None for c in constants.values())
    columns = ("nn_distance",) if held else ("norm", "nn_distance")  # constant norms: one line, not a row of noise
    figure, axes = _figure(len(columns), cols, 5 * cols, 3.5 * len(columns))
    if held:
        values = {f"{c:.6g}" for c in constants.values()}
        figure.suptitle(constant_line("row norms", next(iter(constants.values()))) if len(values) == 1 else
                        "; ".join(constant_line(f"{label}: row norms", c) for label, c in constants.items()), fontsize=9)
    for col, (label, geometry) in enumerate(geometries.items()):
        seen = _seen(geometry)
        for row, column in enumerate(columns):
            ax = axes[row][col]
            words = seen[~seen["punctuation"]]
            punct = seen[seen["punctuation"]]
            ax.scatter(words["count"], words[column], s=4, alpha=0.35, color="C0", label="words")
            ax.scatter(punct["count"], punct[column], s=18, color="C3", label="punctuation")
            ax.set_xscale("log")
            if column == "nn_distance":
                ax.axhline(sigma0, **HELDOUT_STYLE, label="sigma0")
            ax.set_xlabel("training count")
            ax.set_ylabel("row norm" if column == "norm" else "nearest-neighbour distance")
            ax.set_title(f"{label}: {'norms' if column == 'norm' else 'nearest neighbours'} by frequency")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return figure


def embedding_projection(projections: Mapping[str, np.ndarray], geometries: Mapping[str, pd.DataFrame],
                         label_top: int = 12) -> Figure:
    """The table on its top two principal components, coloured by log training count, punctuation
    as red crosses, the most frequent tokens labelled; one panel per checkpoint."""
    cols = max(1, len(projections))
    figure, axes = _figure(1, cols, 5.5 * cols, 4.8)
    for col, (label, coords) in enumerate(projections.items()):
        ax = axes[0][col]
        geometry = geometries[label]
        coords = np.asarray(coords)
        seen = (geometry["count"] > 0).to_numpy()
        punct = geometry["punctuation"].to_numpy() & seen
        words = seen & ~punct
        colour = np.log10(geometry["count"].to_numpy() + 1)
        points = ax.scatter(coords[words, 0], coords[words, 1], c=colour[words], s=5, cmap="viridis", alpha=0.6)
        ax.scatter(coords[punct, 0], coords[punct, 1], marker="x", color="C3", s=30, label="punctuation")
        for index in geometry.nsmallest(label_top, "rank").index:
            ax.annotate(token_label(geometry.at[index, "token"]), coords[index], fontsize=8)
        figure.colorbar(points, ax=ax, label="log10 training count")
        ax.set_title(f"{label}: PCA of the embedding table")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    return figure


def rounding_bias(geometries: Mapping[str, pd.DataFrame], label_top: int = 8) -> Figure:
    """The rounding decoder's per-token bias against training count; one panel per checkpoint. A
    bias rising with frequency is where vectors that carry no information get decoded to."""
    cols = max(1, len(geometries))
    figure, axes = _figure(1, cols, 5 * cols, 3.8)
    for col, (label, geometry) in enumerate(geometries.items()):
        ax = axes[0][col]
        seen = _seen(geometry)
        words, punct = seen[~seen["punctuation"]], seen[seen["punctuation"]]
        ax.scatter(words["count"], words["bias"], s=4, alpha=0.35, color="C0", label="words")
        ax.scatter(punct["count"], punct["bias"], s=18, color="C3", label="punctuation")
        for _, row in seen.nsmallest(label_top, "rank").iterrows():
            ax.annotate(token_label(row["token"]), (row["count"], row["bias"]), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("training count")
        ax.set_ylabel("rounding bias")
        ax.set_title(f"{label}: rounding bias by frequency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def quality_vs_steps(curve: pd.DataFrame) -> Figure:
    """Sample quality against the number of reverse steps (log x), held-out text dashed: the
    generative perplexity when a teacher scored them, entropy, punctuation, vocabulary spread,
    and the agreement of decoded tokens with the longest chain."""
    chains, heldout = curve[curve["steps"].notna()], curve[curve["steps"].isna()]
    panels = [("unigram_entropy", "unigram entropy (bits)"), ("punctuation_share", "punctuation share"),
              ("types_at", "distinct types at a fixed token count"), ("agreement", "tokens equal to the longest chain's")]
    if chains["teacher_perplexity"].notna().any():
        panels.insert(0, ("teacher_perplexity", "generative perplexity (AR teacher)"))
    figure, axes = _figure(1, len(panels), 3.4 * len(panels), 3.4)
    for ax, (column, title) in zip(axes[0], panels):
        ax.plot(chains["steps"], chains[column], "o-", color="C0", label="samples")
        if len(heldout) and column in heldout and heldout[column].notna().any():
            ax.axhline(float(heldout[column].iloc[0]), label="held-out text", **HELDOUT_STYLE)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sampling steps")
        ax.grid(alpha=0.3)
    _legend(axes[0][0], fontsize=8)
    return figure


def quality_against_compute(points: pd.DataFrame, heldout_perplexity: float | None = None) -> Figure:
    """The report index's figure: each report's teacher perplexity (log) against its training
    compute (FLOPs, log), and against its samples per second where at least two reports measured
    them. `points`: one row per report with name, family, train_flops, teacher_perplexity, matched
    (its samples at held-out entropy) and samples_per_s. A hollow marker is a report whose samples
    are not at held-out entropy: its perplexity says as much about that entropy as about the model.
    Held-out text's perplexity (by the same teacher) is the dashed line."""
    speed = points[points["samples_per_s"].notna()] if "samples_per_s" in points else points.iloc[0:0]
    panels = [("train_flops", "training compute (FLOPs, about 6 x parameters x tokens)", points)]
    if len(speed) >= 2:
        panels.append(("samples_per_s", "samples per second (the sample page's curve)", speed))
    figure, axes = _figure(1, len(panels), 5.2 * len(panels), 3.6)
    families = list(dict.fromkeys(points["family"]))
    for ax, (column, label, rows) in zip(axes[0], panels):
        for _, row in rows.iterrows():
            color = f"C{families.index(row['family'])}"
            ax.plot(row[column], row["teacher_perplexity"], "o", markersize=8, color=color,
                    markerfacecolor=color if row["matched"] else "none")
            ax.annotate(str(row["name"]), (row[column], row["teacher_perplexity"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
        if heldout_perplexity is not None:
            ax.axhline(heldout_perplexity, label="held-out text", **HELDOUT_STYLE)
        _log_log(ax, label, "teacher perplexity of samples", x_margin=0.25)
    for index, name in enumerate(families):  # one legend entry per family, filled: the colour is what it says
        axes[0][0].plot([], [], "o", color=f"C{index}", label=name)
    axes[0][0].plot([], [], "o", color="0.4", markerfacecolor="none", label="not at held-out entropy")
    _legend(axes[0][0], fontsize=8)
    return figure


def _log_log(ax, xlabel: str, ylabel: str, x_margin: float) -> None:
    """Both axes logarithmic, labelled, with room for the points' labels and a grid."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.margins(x=x_margin, y=0.15)
    ax.grid(alpha=0.3, which="both")
    for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if low > 0 and high / low > 10:  # over a decade, the 2x-9x labels run into each other
            axis.set_minor_formatter(NullFormatter())


def _spread_labels(ax, labels: list, step: float = 8.0, tries: int = 12) -> None:
    """Moves each point label down by `step` points until its box overlaps no label placed before it
    and stays inside the axes (a label that would cross the right edge goes to the left of its point
    first): two settings that cost the same would otherwise print one on top of the other. Greedy,
    in drawing order; a label that finds no free place in `tries` stays where it started."""
    inside, placed = ax.get_window_extent(), []
    for label in labels:
        if label.get_window_extent().x1 > inside.x1:
            label.set_horizontalalignment("right")
            label.xyann = (-label.xyann[0], label.xyann[1])
        start = label.xyann
        for attempt in range(tries):
            label.xyann = (start[0], start[1] - attempt * step)
            box = label.get_window_extent()
            if not any(box.overlaps(other) for other in placed) and inside.y0 <= box.y0 and box.x1 <= inside.x1:
                break
        else:
            label.xyann = start
        placed.append(label.get_window_extent())


def quality_against_speed(table: pd.DataFrame, heldout_perplexity: float | None = None) -> Figure:
    """The Pareto figure of benchmarks/pareto.py: each row's teacher perplexity at held-out entropy
    (log; its seeds' range as a bar) against its CPU seconds per sample in a batch and against the
    wall seconds of one sample alone (log), a colour per family (in the legend below the panels, so
    the points' own labels name the setting only), each row's frontier joined by a line.
    `table`: pareto.csv (row, family, setting, teacher_ppl, ppl_min, ppl_max, cpu_s_per_sample,
    batch1_s). Held-out text's perplexity is the dashed line."""
    panels = [("cpu_s_per_sample", "CPU seconds per sample (batch of 64)"),
              ("batch1_s", "seconds for one sample alone (batch of 1)")]
    families = list(dict.fromkeys(table["family"]))
    # one family a row: its name goes to the legend and the label keeps the setting
    family_rows = table.groupby("family")["row"].nunique().to_dict()
    figure, axes = _figure(1, len(panels), 6.0 * len(panels), 4.6)
    for ax, (column, label) in zip(axes[0], panels):
        labels = []
        for _, row in table.sort_values("teacher_ppl", ascending=False).iterrows():
            color = f"C{families.index(row['family'])}"
            spread = [[row["teacher_ppl"] - row["ppl_min"]], [row["ppl_max"] - row["teacher_ppl"]]]
            ax.errorbar(row[column], row["teacher_ppl"], yerr=spread, fmt="o", markersize=6, color=color, capsize=2)
            name = str(row["row"]) if row["setting"] == "its own" else (
                str(row["setting"]) if family_rows[row["family"]] == 1 else f"{row['row']}: {row['setting']}")
            labels.append(ax.annotate(name, (row[column], row["teacher_ppl"]), textcoords="offset points",
                                      xytext=(5, 3), fontsize=7, color=color))
        front = table[table[f"frontier_{column}"].astype(bool)].sort_values(column) \
            if f"frontier_{column}" in table else table.iloc[0:0]
        if len(front) > 1:
            ax.plot(front[column], front["teacher_ppl"], "-", color="0.6", linewidth=1, zorder=0,
                    label="the frontier: nothing cheaper is better")
        if heldout_perplexity is not None:
            ax.axhline(heldout_perplexity, label="held-out text", **HELDOUT_STYLE)
        _log_log(ax, label, "teacher perplexity at held-out entropy", x_margin=0.25)
        figure.draw_without_rendering()  # the labels' boxes need the laid-out axes
        _spread_labels(ax, labels)
    for index, name in enumerate(families):
        axes[0][0].plot([], [], "o", color=f"C{index}", label=name)
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncol=len(names), fontsize=8, frameon=False)
    return figure
