"""Reporting: metrics.jsonl, TensorBoard event files (read back), console lines, plots."""

import importlib.util
import struct
import subprocess
import sys

from gptjax.reporting import Reporter, plot_runs, read_metrics


def read_tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TFRecord event files under ``logdir`` (length, crc, Event proto, crc per record)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12: pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_reporter_writes_jsonl_tensorboard_and_lines(tmp_path, capsys):
    rep = Reporter(tmp_path, progress=False, total_steps=20)
    rep.message("header")
    rep.train(10, loss=3.5, grad_norm=1.0, lr=1e-3, tokens_per_sec=100.0, mfu=0.25, tokens=1000)
    rep.eval(10, val_loss=3.25, val_ppl=25.8, unigram_loss=6.0)
    rep.train(20, loss=float("nan"), grad_norm=1.0, lr=1e-3, tokens_per_sec=100.0, mfu=0.25, tokens=2000)
    rep.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 10, 20] and rows[1]["val_loss"] == 3.25
    assert rows[2]["loss"] == "nan"  # JSON has no NaN: stored as a string, never a broken line
    tb = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert tb["train/loss"] == [(10, 3.5)] and tb["eval/val_loss"] == [(10, 3.25)]
    assert [s for s, _ in tb["train/mfu"]] == [10, 20]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "header" and out[1].startswith("step=10 loss=3.5 ") and "val_loss=3.25" in out[2]


def test_the_tensorboard_writer_does_not_load_torch(tmp_path):
    """tensorboardX imports torch when it is installed (3 s of every run's start); the writer keeps it out, and torch
    still imports afterwards. Run in a fresh interpreter: this session may have loaded torch already."""
    code = ("import sys; from gptjax.reporting.tensorboard import TensorBoardWriter; "
            f"w = TensorBoardWriter({str(tmp_path)!r}); w.scalars(3, 'train', {{'loss': 2.5}}); w.close(); "
            "print('torch' in sys.modules); import torch; print(torch.ones(2).sum().item())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert importlib.util.find_spec("torch") is not None  # the test command installs it (interop extra)
    assert r.returncode == 0 and r.stdout.split() == ["False", "2.0"], r.stderr[-2000:]
    assert read_tensorboard_scalars(tmp_path) == {"train/loss": [(3, 2.5)]}


def test_a_silent_reporter_writes_nothing(tmp_path, capsys):
    rep = Reporter(tmp_path, enabled=False, progress=False)
    rep.train(1, loss=1.0, tokens_per_sec=1.0, mfu=0.1)
    rep.message("x")
    rep.close()
    assert not list(tmp_path.iterdir()) and capsys.readouterr().out == ""


def test_plot_runs_draws_one_curve_per_run(tmp_path):
    for name, loss in (("a", 4.0), ("b", 3.0)):
        rep = Reporter(tmp_path / name, progress=False, tensorboard=False)
        for step in (10, 20):
            rep.train(step, loss=loss + 1 / step, tokens_per_sec=50.0, mfu=0.1, tokens=step * 100)
        rep.eval(20, val_loss=loss, val_ppl=1.0, unigram_loss=6.0)
        rep.close()
    png = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "c.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_the_progress_bar_shows_a_nan_loss(tmp_path, monkeypatch):
    """A diverged step used to crash the bar (it formatted the string "nan" as a float)."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rep = Reporter(tmp_path, progress=True, total_steps=5, tensorboard=False)
    assert not rep.bar.disable
    rep.train(1, loss=float("nan"), grad_norm=float("nan"), lr=1e-3, tokens_per_sec=10.0, mfu=0.1, tokens=10)
    assert rep.bar.postfix.startswith("loss=nan")
    rep.close()
