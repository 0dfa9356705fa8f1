import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from dlm.workbench import plots


def png_bytes(figure: Figure) -> int:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return len(buffer.getvalue())


def metrics_frame():
    rows = []
    for step in range(5, 45, 5):
        rows.append({"step": step, "epoch": 1 + step // 20, "total": 3 / step, "mse": 2 / step, "rounding": 1 / step,
                     "prior": 0.0, "embedding_norm": 4.0 - step * 1e-4, "nn_distance": 2.5, "lr": 1e-3,
                     "tokens_per_s": 1000.0, "elapsed_s": step / 10})
        if step % 20 == 0:
            rows.append({"step": step, "epoch": step // 20, "val_total": 4 / step, "val_mse": 3 / step,
                         "val_rounding": 1 / step, "val_prior": 0.0, "elapsed_s": step / 10})
    return pd.DataFrame(rows)


def geometry_frame(n=50):
    rng = np.random.default_rng(0)
    tokens = ["<pad>", "<unk>", ",", "$", "\n", *[f"w{i}" for i in range(n - 5)]]
    return pd.DataFrame({"id": range(n), "token": tokens, "count": rng.integers(0, 100, n), "rank": range(1, n + 1),
                         "norm": rng.random(n) + 3, "nn_distance": rng.random(n), "bias": rng.normal(size=n),
                         "punctuation": [t in (",", "$") for t in tokens]})


def test_token_label_is_safe_for_mathtext():
    assert plots.token_label("$") == r"\$" and plots.token_label("\n") == r"'\n'" and plots.token_label("lord") == "lord"


def test_training_figures_render():
    metrics = metrics_frame()
    for figure in (plots.loss_curves(metrics), plots.training_curves(metrics, sigma0=0.1)):
        assert isinstance(figure, Figure) and png_bytes(figure) > 1000
    assert len(plots.loss_curves(metrics).axes) == 3


def test_nll_over_training_renders_bound_and_validation_loss():
    metrics = metrics_frame()
    bounds = pd.DataFrame({"epoch": [1, 2], "step": [10, 20], "nll_bound": [9.0, 7.5], "nll_bound_se": [0.1, 0.08]})
    figure = plots.nll_over_training(bounds, metrics, ar_nll=5.0)
    assert png_bytes(figure) > 1000
    bound_ax, loss_ax = figure.axes
    assert list(bound_ax.lines[0].get_ydata()) == [9.0, 7.5] and len(loss_ax.lines) == 1
    assert plots.nll_over_training(bounds.iloc[0:0], metrics.iloc[0:0]) is not None  # nothing yet: empty panels


def test_token_distribution_renders_several_streams():
    samples = [[",", ",", "lord", "$", "\n"]] * 3
    heldout = [["my", "lord", ",", "good", "\n"]] * 3
    figure = plots.token_distribution({"samples": samples, "held-out": heldout, "empty": [[]]})
    assert png_bytes(figure) > 1000


@pytest.mark.slow
def test_collapse_figures_render():
    series = pd.DataFrame([
        {"run": run, "epoch": e, "punctuation_share": 0.2 * e, "unigram_entropy": 8 - e, "distinct_1": 0.5,
         "distinct_2": 0.8, "top1_share": 0.1, "top10_share": 0.3, "embedding_norm": 5 - e, "nn_distance": 2 / e,
         "sigma0": 0.12}
        for run in ("a", "b") for e in (1, 2, 3)
    ])
    heldout = {"a": {"punctuation_share": 0.2, "unigram_entropy": 7.0, "distinct_2": 0.9, "top10_share": 0.3}}
    assert png_bytes(plots.collapse_over_training(series, heldout)) > 1000
    assert png_bytes(plots.geometry_over_training(series)) > 1000
    geometry = {"epoch 1": geometry_frame(), "epoch 3": geometry_frame()}
    assert png_bytes(plots.embedding_geometry(geometry, sigma0=0.12)) > 1000
    coords = {k: np.random.default_rng(1).normal(size=(50, 2)) for k in geometry}
    assert png_bytes(plots.embedding_projection(coords, geometry)) > 1000
    assert png_bytes(plots.rounding_bias(geometry)) > 1000


@pytest.mark.parametrize("empty", [pd.DataFrame(columns=["step", "total", "val_total"])])
def test_loss_curves_tolerate_missing_rows(empty):
    assert isinstance(plots.loss_curves(empty), Figure)


def l2_rows(rows=60, dim=32, seed=0):
    """Row norms of a float32 table scaled to norm sqrt(d), as embedding_norm='l2' keeps it."""
    import torch

    table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    table = table / table.norm(dim=1, keepdim=True) * dim ** 0.5
    return table.norm(dim=1).numpy()


def test_constant_is_decided_by_relative_spread():
    norms = l2_rows()
    assert norms.std() > 0  # float32 noise: not exactly equal
    assert plots.constant_value(norms) == pytest.approx(32 ** 0.5)
    assert plots.constant_value(norms * 1000) is not None  # relative, not absolute
    assert plots.constant_value(np.linspace(3.0, 3.003, 10)) is None  # 0.1% is a change worth seeing
    assert plots.constant_value([5.0]) is None and plots.constant_value([np.nan, 2.0]) is None  # one value says nothing


def text_of(figure: Figure) -> str:
    return " ".join([t.get_text() for ax in figure.axes for t in ax.texts] + [figure._suptitle.get_text()
                                                                              if figure._suptitle else ""])


def series_frame(norms):
    return pd.DataFrame({"run": "r", "epoch": range(1, len(norms) + 1), "embedding_norm": norms,
                         "nn_distance": np.linspace(2.0, 1.0, len(norms)), "sigma0": 0.1})


def test_a_norm_the_recipe_holds_constant_is_one_line_not_a_plot_of_noise():
    held = l2_rows(4).mean() + np.array([0.0, 3e-8, -2e-8, 1e-8])  # what an l2 table's mean norm does
    grown = np.array([4.0, 4.2, 4.5, 4.9])
    figure = plots.geometry_over_training(series_frame(held))
    norms_ax = figure.axes[0]
    assert not norms_ax.lines and "mean embedding norm: 5.65685 throughout" in text_of(figure)
    assert figure.axes[1].lines  # the distances are still drawn
    figure = plots.geometry_over_training(series_frame(grown))
    assert figure.axes[0].lines and "throughout" not in text_of(figure)

    metrics = metrics_frame()
    assert plots.training_curves(metrics).axes[0].lines  # 4.0 - step * 1e-4: a real, small change
    metrics["embedding_norm"] = 5.656854 + np.tile([0.0, 1e-8], len(metrics))[: len(metrics)]
    figure = plots.training_curves(metrics)
    assert not figure.axes[0].lines and "mean embedding norm: 5.65685 throughout" in text_of(figure)
    assert png_bytes(figure) > 1000

    geometry = geometry_frame()
    varied = plots.embedding_geometry({"epoch 1": geometry}, sigma0=0.5)
    assert len(varied.axes) == 2 and "throughout" not in text_of(varied)  # norms by frequency, distances
    geometry["norm"] = l2_rows(len(geometry))
    held_figure = plots.embedding_geometry({"epoch 1": geometry, "epoch 2": geometry}, sigma0=0.5)
    assert len(held_figure.axes) == 2  # one row (distances) of two checkpoints, no row of norms
    assert all("nearest" in ax.get_title() for ax in held_figure.axes)
    assert text_of(held_figure).count("row norms: 5.65685 throughout") == 1
    assert png_bytes(held_figure) > 1000


class FakeHandle:
    def __init__(self, shown):
        self.shown = shown

    def update(self, figure, metadata=None):
        self.shown.append(("update", figure, metadata))


def test_live_loss_curves_redraw_one_figure_in_place(tmp_path):
    path = tmp_path / "metrics.csv"
    shown = []

    def show(figure, display_id=False, metadata=None):
        assert display_id is True  # a handle to update, not a new output each time
        shown.append(("display", figure, metadata))
        return FakeHandle(shown)

    live = plots.LiveLossCurves(path, show=show)
    metrics = metrics_frame()
    for rows in (2, 5, len(metrics)):
        metrics.iloc[:rows].to_csv(path, index=False)
        live(metrics.iloc[rows - 1].to_dict())
    assert [kind for kind, _, _ in shown] == ["display", "update", "update"] and live.redraws == 2
    assert all(isinstance(figure, Figure) and metadata == {"dlm_live": True} for _, figure, metadata in shown)
    points = [len(figure.axes[0].lines[0].get_xdata()) for _, figure, _ in shown]  # train rows drawn
    assert points == sorted(points) and points[0] < points[-1]  # each redraw reads the run so far


def test_quality_against_compute_marks_samples_off_held_out_entropy_hollow():
    points = pd.DataFrame([
        {"name": "a", "family": "masked diffusion", "train_flops": 1e14, "teacher_perplexity": 60.0, "matched": True,
         "samples_per_s": 2.0},
        {"name": "b", "family": "Gaussian diffusion", "train_flops": 2e14, "teacher_perplexity": 400.0,
         "matched": False, "samples_per_s": None}])
    figure = plots.quality_against_compute(points, heldout_perplexity=74.0)
    assert len(figure.axes) == 1  # one report measured samples/s: no speed panel
    ax = figure.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    markers = {line.get_xdata()[0]: line.get_markerfacecolor() for line in ax.lines if len(line.get_xdata()) == 1}
    assert markers[2e14] == "none" and markers[1e14] != "none"  # b is not at held-out entropy
    assert any(list(line.get_ydata()) == [74.0, 74.0] for line in ax.lines)  # held-out text's line
    assert {t.get_text() for t in ax.texts} == {"a", "b"}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "masked diffusion" in labels and "not at held-out entropy" in labels and "held-out text" in labels
    points.loc[1, "samples_per_s"] = 0.5
    assert len(plots.quality_against_compute(points).axes) == 2  # and against speed, once two measured it
    assert png_bytes(figure) > 0


def test_the_first_live_frame_draws_its_one_point_and_waits_while_there_is_none(tmp_path):
    """train.ipynb's first frame came after one log line: one point, drawn as a line, is nothing."""
    path = tmp_path / "metrics.csv"
    shown = []

    def show(figure, display_id=False, metadata=None):
        shown.append(figure)
        return FakeHandle([])

    live = plots.LiveLossCurves(path, show=show)
    metrics = metrics_frame()
    metrics.iloc[:0].to_csv(path, index=False)  # the header alone
    live()
    assert shown == []  # no empty axes: it waits for a value
    metrics.iloc[:1].to_csv(path, index=False)  # the first log line
    live(metrics.iloc[0].to_dict())
    assert len(shown) == 1
    for ax in shown[0].axes:
        (train,) = ax.lines
        assert len(train.get_xdata()) == 1 and train.get_marker() not in (None, "None", "", " ")
    assert png_bytes(shown[0]) > 1000
