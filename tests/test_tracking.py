"""What a user watches: the loss plot stays readable (scalora/tracking.py's loss_figure)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from scalora.tracking import loss_figure  # noqa: E402


def _rows(first: float, last: float, steps: int = 30, em: bool = True) -> list[dict]:
    rows = [{"step": s, "train/loss": first * (last / first) ** (s / steps)} for s in range(1, steps + 1)]
    for s in (0, 10, 20, 30):
        rows.append({"step": s, "eval/loss": first * (last / first) ** (s / steps), **(
            {"eval/exact_match": s / steps} if em else {})})
    return rows


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_legend_covers_no_line_and_a_falling_loss_gets_a_log_axis():
    for first, last, scale in ((2.9, 0.072, "log"), (2.0, 1.4, "linear")):
        fig = loss_figure(_rows(first, last))
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = fig.axes
        assert len(axes) == 2 and axes[0].get_yscale() == scale, (first, last)
        legends = fig.legends
        assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == [
            "train loss", "validation loss", "validation exact match"]  # one legend for both axes
        box = legends[0].get_window_extent(renderer)
        assert not any(_overlaps(box, ax.get_window_extent(renderer)) for ax in axes)
        assert box.y1 <= min(ax.get_tightbbox(renderer).y0 for ax in axes) + 1  # below the tick labels too
        plt.close(fig)


def test_a_run_without_validation_still_plots():
    fig = loss_figure([{"step": s, "train/loss": 1.0 / s} for s in range(1, 5)])
    fig.canvas.draw()
    assert len(fig.axes) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == ["train loss"]
    plt.close(fig)


def test_resuming_drops_metric_and_sample_lines_written_after_the_checkpoint(tmp_path):
    """A run killed at step 5 resumes from its step-3 checkpoint: lines of steps 4-5 (and one cut short by the
    kill) go from metrics.jsonl and samples.jsonl, so the history equals an uninterrupted run's."""
    import json

    from scalora.tracking import Tracker

    for name, key in (("metrics.jsonl", "train/loss"), ("samples.jsonl", "generated")):
        lines = [json.dumps({"step": s, key: s}) + "\n" for s in range(6)]
        (tmp_path / name).write_text("".join(lines) + '{"step": 6, "trunc')
    tracker = Tracker.__new__(Tracker)
    tracker.main, tracker.path = True, str(tmp_path / "metrics.jsonl")
    tracker.truncate_after(3)
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert [json.loads(line)["step"] for line in open(tmp_path / name)] == [0, 1, 2, 3], name
