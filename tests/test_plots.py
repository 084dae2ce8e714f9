"""Tests of ddpmkit.viz (grids, plots, animation): every picture is a valid, non-blank file of the expected size and
content."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit import viz
from ddpmkit.viz import grids, plots
from ddpmkit.errors import DdpmkitError
from ddpmkit.images import from_uint8


# ------------------------------------------------------------------------------------------ helpers
def digits(n=8, size=16):
    """Realistic small grayscale images in [-1, 1]: sklearn's 8x8 digits upsampled to size x size."""
    from sklearn.datasets import load_digits

    d = torch.from_numpy(load_digits().images[:n]).float().unsqueeze(1) / 16.0
    d = torch.nn.functional.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)
    return d.clamp(0, 1) * 2 - 1


def assert_not_blank(path):
    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"))
    assert arr.size > 0
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 1, f"{path} is all one colour"
    return arr


def no_temp_files(directory):
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def write_metrics(path, n=200, buckets=0, columns=("step", "loss", "lr", "grad_norm", "img_per_s", "wall_s")):
    rng = np.random.default_rng(0)
    cols = list(columns) + [f"loss_t{k}" for k in range(buckets)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for j in range(n):
            step = (j + 1) * 10
            vals = {
                "step": step,
                "loss": 0.03 + 0.5 * math.exp(-step / 500) + 0.005 * abs(rng.standard_normal()),
                "lr": 2e-4 * min(1.0, step / 300),
                "grad_norm": 1.0 + rng.random(),
                "img_per_s": 800 + 20 * rng.standard_normal(),
                "wall_s": step * 0.1,
            }
            row = [vals[c] for c in columns]
            row += [(0.2 * math.exp(-k / 2) + 0.01) * (1 + math.exp(-step / 500)) for k in range(buckets)]
            w.writerow(row)
    return path


# ------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("n,nrow,padding,scale", [(5, 3, 2, 3), (16, None, 2, None), (7, 10, 0, 1), (1, None, 4, 2)])
def test_make_grid_size_is_exact(n, nrow, padding, scale):
    h, w = 16, 12
    x = torch.rand(n, 1, h, w) * 2 - 1
    g = viz.make_grid(x, nrow=nrow, padding=padding, scale=scale)
    cols = min(nrow if nrow is not None else math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / cols)
    s = scale if scale is not None else viz.default_scale(h, w)
    assert g.dtype == np.uint8
    assert g.shape == (rows * (h * s + padding) + padding, cols * (w * s + padding) + padding, 1)


def test_default_scale_makes_small_images_visible():
    assert viz.default_scale(16, 16) == 4
    assert viz.default_scale(32, 32) == 2
    assert viz.default_scale(28, 28) == 3
    assert viz.default_scale(64, 64) == 1
    assert viz.default_scale(256, 256) == 1
    g = viz.make_grid(torch.zeros(4, 3, 32, 32), padding=2)
    assert g.shape == (2 * (64 + 2) + 2, 2 * (64 + 2) + 2, 3)


def test_make_grid_places_image_k_at_its_tile():
    n, h, w, s, pad, nrow = 7, 5, 6, 3, 2, 3
    values = [10 + 30 * k for k in range(n)]  # distinct constant images, none equal to the border
    x = torch.stack([torch.full((1, h, w), v, dtype=torch.uint8) for v in values])
    g = viz.make_grid(x, nrow=nrow, padding=pad, scale=s, pad_value=255)[:, :, 0]
    th, tw = h * s, w * s
    for k, v in enumerate(values):
        r, c = divmod(k, nrow)
        y, xx = pad + r * (th + pad), pad + c * (tw + pad)
        assert (g[y:y + th, xx:xx + tw] == v).all(), f"tile {k}"
        assert (g[y - pad:y, xx:xx + tw] == 255).all()  # the border above it
    # the two unused tiles of the last row are border-coloured
    y = pad + 2 * (th + pad)
    assert (g[y:y + th, pad + 1 * (tw + pad):] == 255).all()
    assert (g[:pad] == 255).all() and (g[:, :pad] == 255).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_and_float_inputs_give_identical_grids(channels):
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (6, channels, 9, 9), generator=g, dtype=torch.uint8)
    u[0, :, 0, 0] = 0
    u[0, :, 0, 1] = 255
    a = viz.make_grid(u, nrow=4)
    b = viz.make_grid(from_uint8(u), nrow=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, viz.make_grid(u.numpy(), nrow=4))  # numpy arrays too


def test_make_grid_rejects_bad_input():
    with pytest.raises(viz.PlotError):
        viz.make_grid(torch.zeros(2, 2, 8, 8))  # 2 channels
    with pytest.raises(viz.PlotError):
        viz.make_grid(torch.zeros(0, 1, 8, 8))
    with pytest.raises(viz.PlotError):
        viz.make_grid(torch.zeros(2, 1, 8, 8), nrow=0)
    with pytest.raises(viz.PlotError):
        viz.make_grid(torch.zeros(2, 1, 8, 8, dtype=torch.int64))


def test_save_grid_writes_a_png_of_the_grid_size(tmp_path):
    x = digits(10)
    p = viz.save_grid(x, tmp_path / "grid.png", nrow=5)
    assert p == tmp_path / "grid.png"
    with Image.open(p) as im:
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == (5 * (64 + 2) + 2, 2 * (64 + 2) + 2)
        np.testing.assert_array_equal(np.asarray(im), viz.make_grid(x, nrow=5)[:, :, 0])
    assert_not_blank(p)
    p = viz.save_grid(torch.rand(4, 3, 32, 32) * 2 - 1, tmp_path / "sub" / "rgb.png")  # makes the folder
    with Image.open(p) as im:
        assert im.mode == "RGB" and im.size == (2 * 66 + 2, 2 * 66 + 2)
    assert no_temp_files(tmp_path)


def test_save_image_and_save_images_are_native_resolution(tmp_path):
    x = digits(3)
    p = viz.save_image(x[1], tmp_path / "one.png")
    with Image.open(p) as im:
        assert im.size == (16, 16) and im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), viz.make_grid(x[1:2], padding=0, scale=1)[:, :, 0])
    paths = viz.save_images(x, tmp_path / "samples", start=7)
    assert [q.name for q in paths] == ["sample_00007.png", "sample_00008.png", "sample_00009.png"]
    for q in paths:
        with Image.open(q) as im:
            assert im.size == (16, 16)
    rgb = viz.save_images(torch.rand(2, 3, 8, 8), tmp_path / "rgb", prefix="img")
    assert [q.name for q in rgb] == ["img_00000.png", "img_00001.png"]
    with Image.open(rgb[0]) as im:
        assert im.mode == "RGB" and im.size == (8, 8)
    with pytest.raises(viz.PlotError):
        viz.save_image(x, tmp_path / "batch.png")


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        grids._write_file(target, boom)
    assert target.read_bytes() == b"old"
    assert no_temp_files(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DdpmkitError):  # a path under a file: one clear error
        viz.save_grid(digits(1), tmp_path / "afile" / "grid.png")


# ------------------------------------------------------------------------------------------ chain
def test_chain_recorder_picks_evenly_spaced_steps_including_the_last():
    r = viz.ChainRecorder(1000, num_frames=40)
    assert len(r.steps) == 40 and r.steps[0] == 0 and r.steps[-1] == 999
    assert set(np.diff(r.steps)) <= {25, 26}
    assert r.steps == tuple((2 * k * 999 + 39) // 78 for k in range(40))
    assert viz.ChainRecorder(10, num_frames=40).steps == tuple(range(10))
    assert viz.ChainRecorder(40, num_frames=40).steps == tuple(range(40))
    assert viz.ChainRecorder(41, num_frames=40).steps[-1] == 40
    assert viz.ChainRecorder(50, num_frames=1).steps == (49,)
    assert viz.ChainRecorder(50, num_frames=2).steps == (0, 49)
    for S in (2, 3, 57, 100, 250):
        for F in (2, 3, 7, 40):
            st = viz.ChainRecorder(S, num_frames=F).steps
            assert st[-1] == S - 1 and len(set(st)) == len(st) == min(S, F)


def test_chain_recorder_keeps_cpu_uint8_copies_of_the_first_samples():
    S = 100
    r = viz.ChainRecorder(S, num_samples=3, num_frames=5)
    x0 = digits(4)
    r.initial(torch.randn(4, 1, 16, 16))
    for i in range(S):
        x = x0 * (i / (S - 1))
        r(i, torch.full((4,), S - 1 - i), x, x0)
    assert r.recorded_steps == [-1, *r.steps]
    assert len(r) == 6
    last = r.frames[-1]
    assert last.step == S - 1 and last.t == 0
    assert last.x_t.dtype == np.uint8 and last.x_t.shape == (3, 16, 16, 1)
    np.testing.assert_array_equal(last.x_t[0], viz.make_grid(x0[:1], padding=0, scale=1))
    assert r.frames[0].x0_hat is None and r.frames[1].t == S - 1
    r(S - 1, 0, x0, x0)  # a repeated call does not add a frame
    assert len(r) == 6


@pytest.mark.parametrize("channels,initial", [(1, True), (3, False)])
def test_chain_gif_has_exactly_the_returned_frame_count(tmp_path, channels, initial):
    S, ns = 60, 4
    g = torch.Generator().manual_seed(0)
    x0 = digits(ns) if channels == 1 else torch.rand(ns, 3, 16, 16, generator=g) * 2 - 1
    r = viz.ChainRecorder(S, num_samples=ns, num_frames=12)
    xt = torch.randn(x0.shape, generator=g)
    if initial:
        r.initial(xt)
    for i in range(S):
        a = (i + 1) / S
        xt = a * x0 + (1 - a) * torch.randn(x0.shape, generator=g)
        r(i, S - 1 - i, xt, x0)
    path = tmp_path / "chain.gif"
    n = viz.save_chain_gif(r, path, hold_frames=10, frame_ms=80)
    assert n == len(r.frames) == 12 + initial
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == n and im.is_animated
        durations = []
        for k in range(im.n_frames):
            im.seek(k)
            durations.append(im.info["duration"])
        im.seek(n - 1)
        last = np.asarray(im.convert("RGB"))
    assert durations[:-1] == [80] * (n - 1)
    assert durations[-1] == 80 * (1 + 10)  # the hold is a longer last frame
    s = viz.default_scale(16, 16)
    assert last.shape[0] > 2 * s * 16 and last.shape[1] > ns * s * 16
    assert len(np.unique(last.reshape(-1, 3), axis=0)) > 1
    assert no_temp_files(tmp_path)


def test_chain_gif_without_frames_is_a_clear_error(tmp_path):
    with pytest.raises(DdpmkitError):
        viz.save_chain_gif(viz.ChainRecorder(10), tmp_path / "x.gif")
    assert not (tmp_path / "x.gif").exists()


# ------------------------------------------------------------------------------------------ figures
def test_plot_schedule(tmp_path):
    p = viz.plot_schedule(tmp_path / "schedule.png", T=1000)
    arr = assert_not_blank(p)
    assert arr.shape[0] > 400 and arr.shape[1] > 600
    # both schedule colours appear
    for hexc in (viz.COLORS["linear"], viz.COLORS["cosine"]):
        rgb = np.array([int(hexc[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(arr.astype(int) - rgb).sum(-1) < 30).sum() > 200, hexc


def test_plot_forward_one_and_several_images(tmp_path):
    x = digits(2)
    p1 = viz.plot_forward(x[:1], tmp_path / "fwd1.png")
    p2 = viz.plot_forward((x * 127.5 + 127.5).round().to(torch.uint8), tmp_path / "fwd2.png", ts=(0, 100, 999))
    a1, a2 = assert_not_blank(p1), assert_not_blank(p2)
    assert a2.shape[0] > a1.shape[0]  # two row pairs are taller than one
    with pytest.raises(DdpmkitError):
        viz.plot_forward(x, tmp_path / "bad.png", ts=(0, 1000), T=1000)


def test_plot_loss_with_and_without_bucket_columns(tmp_path):
    p = viz.plot_loss(write_metrics(tmp_path / "m.csv"), tmp_path / "loss.png")
    a = assert_not_blank(p)
    pb = viz.plot_loss(write_metrics(tmp_path / "mb.csv", buckets=10), tmp_path / "loss_b.png")
    b = assert_not_blank(pb)
    assert b.shape[1] > a.shape[1]  # the bucket panels widen the figure
    # only the required columns
    pm = viz.plot_loss(write_metrics(tmp_path / "min.csv", n=5, columns=("step", "loss")), tmp_path / "min.png")
    assert_not_blank(pm)
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("content", ["", "step,loss,lr,grad_norm,img_per_s,wall_s\n", "\n\n"])
def test_plot_loss_on_an_empty_csv_is_a_clear_error(tmp_path, content):
    f = tmp_path / "metrics.csv"
    f.write_text(content)
    with pytest.raises(DdpmkitError, match="metrics file"):
        viz.plot_loss(f, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_plot_loss_bad_files(tmp_path):
    with pytest.raises(viz.PlotError, match="not found"):
        viz.plot_loss(tmp_path / "missing.csv", tmp_path / "loss.png")
    (tmp_path / "noloss.csv").write_text("step,lr\n1,0.1\n")
    with pytest.raises(viz.PlotError, match="loss"):
        viz.plot_loss(tmp_path / "noloss.csv", tmp_path / "loss.png")
    (tmp_path / "text.csv").write_text("step,loss\n1,0.5\n2,abc\n")
    with pytest.raises(viz.PlotError, match="line 3"):
        viz.plot_loss(tmp_path / "text.csv", tmp_path / "loss.png")


def test_load_metrics_keeps_the_latest_rows_of_a_resumed_run(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("step,loss,loss_t0\n10,1.0,\n20,0.9,0.5\n30,0.8,0.4\n20,0.7,0.3\n30,0.6,0.2\n40,0.5,0.1\n")
    d = viz.load_metrics(f)
    np.testing.assert_array_equal(d["step"], [10, 20, 30, 40])
    np.testing.assert_array_equal(d["loss"], [1.0, 0.7, 0.6, 0.5])
    assert math.isnan(d["loss_t0"][0])


def test_ema_smooth_is_bias_corrected():
    np.testing.assert_allclose(viz.ema_smooth(np.full(50, 3.0), 0.99), 3.0)
    y = viz.ema_smooth([np.nan, 1.0, np.nan, 3.0], 0.5)
    assert math.isnan(y[0]) and y[1] == 1.0 and y[2] == 1.0
    assert y[3] == pytest.approx((0.5 * 0.5 * 1 + 0.5 * 3) / (1 - 0.25))


def test_writing_a_grid_does_not_import_matplotlib():
    import subprocess
    import sys

    code = ("import sys; from ddpmkit.viz.grids import save_grid; from ddpmkit.viz import make_grid; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert viz.plot_loss is plots.plot_loss and viz.save_grid is grids.save_grid  # one object, two addresses
