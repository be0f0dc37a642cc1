import json

from smoltrain.train.metrics import flatten, plot_losses, read_metrics, truncate_metrics


def test_truncate_drops_the_steps_a_resume_redoes_and_the_plot_is_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 / s} for s in (1, 2, 3, 4)] + [{"step": 2, "eval_loss": 4.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncate_metrics(path, 2)
    assert read_metrics(path) == [r for r in rows if r["step"] <= 2]
    plot_losses(path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_flatten_gives_the_trackers_dotted_plain_values():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": "None"}
