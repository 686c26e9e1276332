"""`esm2 score --scan --heatmap`'s figure: its whole title inside the image, and the x
axis read as a protein engineer reads it, by wild-type residue and position."""

from __future__ import annotations

import numpy as np
import pytest

from esm2_service.client.scores import ScoreResult
from esm2_service.client.variant_table import draw_heatmap

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
WILD_TYPE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQ"


def scan_result(length: int) -> ScoreResult:
    rng = np.random.default_rng(0)
    log_probs = np.log(rng.dirichlet(np.ones(20), size=length))
    return ScoreResult(
        mutants=[],
        scores={},
        positions=list(range(1, length + 1)),
        log_probs={"masked_marginal": log_probs},
        amino_acids=AMINO_ACIDS,
    )


def drawn_figure(monkeypatch, tmp_path, wild_type: str) -> Figure:
    """The figure draw_heatmap saved (as it was when saved), and a check that it saved."""
    saved = []
    save = Figure.savefig

    def keep(figure, *args, **kwargs):
        saved.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    path = tmp_path / "scan.png"
    draw_heatmap(scan_result(len(wild_type)), wild_type, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = saved
    return figure


@pytest.mark.parametrize("length", [10, 83])
def test_the_whole_title_is_inside_the_figure(monkeypatch, tmp_path, length):
    figure = drawn_figure(monkeypatch, tmp_path, WILD_TYPE[:length])
    canvas = FigureCanvasAgg(figure)  # pyplot.close() may have taken the figure's own
    canvas.draw()
    renderer = canvas.get_renderer()
    (axes,) = [a for a in figure.axes if a.get_title()]

    title = axes.title.get_window_extent(renderer)
    frame = figure.bbox
    assert frame.x0 <= title.x0 and title.x1 <= frame.x1, (title, frame)
    assert frame.y0 <= title.y0 and title.y1 <= frame.y1, (title, frame)


def test_positions_are_labelled_by_their_wild_type_residue(monkeypatch, tmp_path):
    figure = drawn_figure(monkeypatch, tmp_path, WILD_TYPE[:10])
    (axes,) = [a for a in figure.axes if a.get_title()]

    labels = [label.get_text() for label in axes.get_xticklabels()]
    assert labels == ["M1", "K2", "T3", "A4", "Y5", "I6", "A7", "K8", "Q9", "R10"]


def test_a_long_sequence_labels_every_kth_position(monkeypatch, tmp_path):
    wild_type = WILD_TYPE * 4
    figure = drawn_figure(monkeypatch, tmp_path, wild_type)
    (axes,) = [a for a in figure.axes if a.get_title()]

    labels = [label.get_text() for label in axes.get_xticklabels()]
    assert 10 <= len(labels) <= 80
    for label, tick in zip(labels, axes.get_xticks(), strict=True):
        position = int(tick) + 1
        assert label == f"{wild_type[position - 1]}{position}"
