"""Editing against closed forms: RePaint on a correlated Gaussian prior with its exact noise predictor, the known
pixels kept exactly, SDEdit's two ends, the inputs' one-line errors, and the two commands end to end.

The Gaussian: x0 ~ N(mu, Sigma) in d = 4 dimensions, coordinates 0 and 1 known, 2 and 3 unknown. Then
x_t ~ N(sqrt(ab) mu, ab Sigma + (1 - ab) I) and the exact noise predictor is
E[eps | x_t] = sqrt(1 - ab) (ab Sigma + (1 - ab) I)^-1 (x_t - sqrt(ab) mu); the unknown coordinates given the
known ones are N(mu_u + S_uk S_kk^-1 (x_k - mu_k), S_uu - S_uk S_kk^-1 S_ku).

Tolerances, in the whitened coordinates z = L^-1 (x_u - m) of the exact conditional (L L^T its covariance), where z
should be N(0, I): N = 4000 samples; every |mean(z)| <= 0.1 + 4 / sqrt(N) = 0.163 and every entry of
|cov(z) - I| <= 0.1 + 4 sqrt(2 / N) = 0.189, that is four standard errors plus an allowance of 0.1 for the bias RePaint
keeps at any R (it is not an exact sampler: measured, the whitened mean stays near 0.06-0.10 from R = 10 to 20 at
S = 250). RePaint at S = 250 of T = 1000, J = 10 passes from R = 10 (seeds 0 and 1: whitened mean 0.080 and 0.105,
covariance 0.117 and 0.101); R = 5 misses the mean (0.19), R = 2 by 0.44, R = 1 by 0.64, four times the tolerance.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.diffusion.denoiser import DEFAULT_GUIDANCE
from ddpmkit.edit import (EditError, check_mask, load_images, make_mask, parse_mask, repaint, repaint_levels,
                          repaint_model_calls, sdedit, sdedit_timesteps)
from ddpmkit.images import from_uint8, to_uint8
from ddpmkit.samplers import PerSampleNoise, sample, sampler_names, timesteps

D = 4
A = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.8, 0, 0], [0.4, -0.2, 0.8, 0], [-0.3, 0.4, 0.3, 0.7]], dtype=torch.float64)
SIGMA = A @ A.T
MU = torch.tensor([0.2, -0.1, 0.3, 0.0], dtype=torch.float64)
K, U = [0, 1], [2, 3]
X_KNOWN = torch.tensor([1.2, -0.4], dtype=torch.float64)


def gaussian_denoiser(T=1000, variance="small"):
    """The exact eps predictor of N(MU, SIGMA) under a linear schedule, as a Denoiser over [B, 1, 1, D]."""
    sched = NoiseSchedule.linear(T)

    def net(x, t):
        ab = sched.alpha_bar_at(t).view(-1, 1, 1)  # real-valued t too, for the samplers that use it
        z = x.double().reshape(-1, 1, D)
        C = ab * SIGMA + (1 - ab) * torch.eye(D, dtype=torch.float64)  # Cov(x_t), from DDPM eq. 4
        eps = (1 - ab).sqrt() * torch.linalg.solve(C, (z - ab.sqrt() * MU).transpose(1, 2)).transpose(1, 2)
        return eps.reshape(x.shape).float()  # E[eps | x_t] = Cov(eps, x_t) Cov(x_t)^-1 (x_t - E x_t)

    return Denoiser(net, sched, "eps", variance, clip_x0=False)


def exact_conditional():
    s_uk, s_kk, s_uu = SIGMA[U][:, K], SIGMA[K][:, K], SIGMA[U][:, U]
    mean = MU[U] + s_uk @ torch.linalg.solve(s_kk, X_KNOWN - MU[K])  # Gaussian conditioning
    cov = s_uu - s_uk @ torch.linalg.solve(s_kk, s_uk.T)
    return mean, cov


def whitened_errors(x):
    """(max |mean(z)|, max |cov(z) - I|) of the unknown coordinates whitened by the exact conditional."""
    mean, cov = exact_conditional()
    xu = x.reshape(-1, D)[:, U].double()
    z = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), (xu - mean).T, upper=False).T
    return z.mean(0).abs().max().item(), (torch.cov(z.T) - torch.eye(2, dtype=torch.float64)).abs().max().item()


N_GAUSS = 4000
TOL_MEAN = 0.1 + 4 / math.sqrt(N_GAUSS)
TOL_COV = 0.1 + 4 * math.sqrt(2 / N_GAUSS)


def gaussian_repaint(resample, seed=0, **kw):
    img = torch.zeros(N_GAUSS, 1, 1, D)
    img[..., K] = X_KNOWN.float()
    mask = torch.tensor([True, True, False, False]).view(1, 1, 1, D)
    x = repaint(gaussian_denoiser(), img, mask, steps=250, jump=10, resample=resample,
                noise=torch.Generator().manual_seed(seed), **kw)
    return img, x


@pytest.mark.parametrize("seed", [0, 1])
def test_repaint_with_resampling_matches_the_exact_conditional(seed):
    img, x = gaussian_repaint(10, seed)
    m, c = whitened_errors(x)
    assert m <= TOL_MEAN and c <= TOL_COV, (m, c)
    assert torch.equal(x[..., K], img[..., K])  # the known coordinates, exactly


def test_repaint_without_resampling_misses_the_conditional():
    _, x = gaussian_repaint(1)
    m, c = whitened_errors(x)
    assert m > 3 * TOL_MEAN, (m, c)  # measured 0.64


def test_repaint_levels_are_the_official_schedule():
    # get_schedule_jump(t_T=6, jump_length=2, jump_n_sample=3) of the RePaint code, by hand
    assert repaint_levels(6, 2, 3) == [5, 4, 3, 2, 3, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, -1]
    assert repaint_levels(5, 10, 10) == [4, 3, 2, 1, 0, -1]  # no room to jump
    assert repaint_model_calls(250, 10, 10) == 250 + 24 * 9 * 10
    with pytest.raises(ValueError):
        repaint_levels(10, 0, 1)


def test_repaint_with_resample_one_is_replacement_only():
    """R = 1 calls the network once per step, like the ancestral sampler it is built on."""
    calls = []
    den = gaussian_denoiser(T=50)
    base = den.net
    den.net = lambda x, t: (calls.append(1), base(x, t))[1]
    repaint(den, torch.zeros(3, 1, 1, D), torch.tensor([True, False, False, False]).view(1, 1, 1, D), steps=20,
            jump=5, resample=1, noise=0)
    assert len(calls) == 20


def test_known_pixels_come_back_exactly_and_files_round_trip():
    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (5, 3, 8, 8), generator=g, dtype=torch.uint8)
    x0 = from_uint8(u8)
    mask = make_mask("random:0.5", (8, 8), seed=1)
    den = Denoiser(lambda x, t: torch.randn_like(x), NoiseSchedule.linear(40), clip_x0=True)
    y = repaint(den, x0, mask, steps=10, jump=3, resample=2, noise=PerSampleNoise(0))
    m = mask.expand_as(x0)
    assert torch.equal(y[m], x0[m])
    assert torch.equal(to_uint8(y)[m], u8[m])  # and so do the written files' known pixels
    assert not torch.equal(y[~m], x0[~m])


def test_repaint_does_not_depend_on_the_batch():
    den = gaussian_denoiser(T=100)
    img = torch.randn(6, 1, 1, D)
    mask = torch.tensor([True, True, False, False]).view(1, 1, 1, D)
    whole = repaint(den, img, mask, steps=20, jump=5, resample=3, noise=PerSampleNoise(7))
    parts = torch.cat([repaint(den, img[:4], mask, steps=20, jump=5, resample=3, noise=PerSampleNoise(7, 0)),
                       repaint(den, img[4:], mask, steps=20, jump=5, resample=3, noise=PerSampleNoise(7, 4))])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- SDEdit
@pytest.mark.parametrize("sampler", sampler_names())
def test_sdedit_strength_zero_returns_the_input_and_one_is_plain_sampling(sampler):
    den = gaussian_denoiser(T=100)
    img = torch.randn(5, 1, 1, D)
    assert torch.equal(sdedit(den, img, 0.0, sampler=sampler, steps=10, noise=0), img)
    got = sdedit(den, img, 1.0, sampler=sampler, steps=10, noise=PerSampleNoise(4))
    want = sample(den, (5, 1, 1, D), sampler=sampler, steps=10, noise=PerSampleNoise(4))
    assert torch.equal(got, want)
    mid = sdedit(den, img, 0.5, sampler=sampler, steps=10, noise=PerSampleNoise(4))
    assert torch.isfinite(mid).all() and not torch.equal(mid, img) and not torch.equal(mid, want)


def test_sdedit_noises_to_t0_and_walks_the_tail():
    T = 100
    tau = timesteps(T, 10, "uniform")  # 0, 10, ..., 90
    assert sdedit_timesteps(tau, T, 0.5).tolist() == [0, 10, 20, 30, 40]  # tau + 1 <= 50
    assert sdedit_timesteps(tau, T, 1.0).tolist() == tau.tolist()
    assert len(sdedit_timesteps(tau, T, 0.0)) == 0
    # DDIM eta = 0 with a network that predicts eps = 0 keeps x_t / sqrt(alpha_bar): the result is x_t0 / sqrt(ab_t0)
    sched = NoiseSchedule.linear(T)
    den = Denoiser(lambda x, t: torch.zeros_like(x), sched, clip_x0=False)
    img = torch.full((1, 1, 2, 2), 0.5)
    eps = PerSampleNoise(9).initial(img.shape)
    ab = sched.alpha_bar.double()[40].item()
    want = (math.sqrt(ab) * img + math.sqrt(1 - ab) * eps) / math.sqrt(ab)  # DDPM eq. 4, then DDIM eq. 12
    got = sdedit(den, img, 0.5, sampler="ddim", steps=10, noise=PerSampleNoise(9))
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x"])
def test_strength_outside_the_unit_interval_is_one_line(bad):
    with pytest.raises(EditError, match="strength"):
        sdedit(gaussian_denoiser(T=50), torch.zeros(1, 1, 1, D), bad)


# ---------------------------------------------------------------------------------------------- inputs
def test_mask_shortcuts():
    m = make_mask("bottom-half", (4, 4))
    assert m[0, 0, :2].all() and not m[0, 0, 2:].any()
    assert make_mask("left-half", (4, 4))[0, 0, :, 2:].all() and not make_mask("left-half", (4, 4))[0, 0, :, :2].any()
    c = make_mask("center", (8, 8))
    assert not c[0, 0, 2:6, 2:6].any() and c.sum() == 64 - 16
    r = make_mask("random:0.25", (8, 8), seed=0)
    assert (~r).sum() == 16 and torch.equal(r, make_mask("random:0.25", (8, 8), seed=0))
    for bad in ("random:0", "random:1", "random:x", "diagonal"):
        with pytest.raises(EditError):
            make_mask(bad, (4, 4))


def test_mask_and_image_files_are_checked(tmp_path):
    Image.fromarray(np.full((8, 8), 255, np.uint8), "L").save(tmp_path / "all.png")
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "none.png")
    Image.fromarray(np.zeros((6, 6), np.uint8), "L").save(tmp_path / "small.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(tmp_path / "rgb.png")
    assert parse_mask(str(tmp_path / "all.png"), (8, 8)).all()
    with pytest.raises(EditError, match="no pixel is known"):
        parse_mask(str(tmp_path / "none.png"), (8, 8))
    with pytest.raises(EditError, match="--resize"):
        parse_mask(str(tmp_path / "small.png"), (8, 8))
    assert parse_mask(str(tmp_path / "all.png"), (4, 4), resize=True).shape == (1, 1, 4, 4)
    with pytest.raises(EditError, match="mode RGB"):
        parse_mask(str(tmp_path / "rgb.png"), (8, 8))
    with pytest.raises(EditError, match="no such file"):
        parse_mask(str(tmp_path / "missing.png"), (8, 8))
    with pytest.raises(EditError, match="mode RGB"):
        load_images(str(tmp_path / "rgb.png"), (1, 8, 8))
    with pytest.raises(EditError, match="mode L"):
        load_images(str(tmp_path / "all.png"), (3, 8, 8))
    with pytest.raises(EditError, match="--resize"):
        load_images(str(tmp_path / "small.png"), (1, 8, 8))
    x, labels, _ = load_images(str(tmp_path / "small.png"), (1, 8, 8), resize=True)
    assert x.shape == (1, 1, 8, 8) and labels is None
    with pytest.raises(EditError, match="no pixel"):
        check_mask(torch.zeros(1, 1, 8, 8), (1, 8, 8))
    with pytest.raises(EditError, match="shape"):
        check_mask(torch.ones(1, 2, 8, 8), (3, 8, 8))


def test_digits_by_index():
    x, labels, names = load_images("digits:0,17", (1, 8, 8))
    assert x.shape == (2, 1, 8, 8) and labels.tolist() == [0, 7] and names == ["digits:0", "digits:17"]
    for bad in ("digits:x", "digits:5000"):
        with pytest.raises(EditError):
            load_images(bad, (1, 8, 8))


# ---------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import tiny_run

    return tiny_run(tmp_path_factory.mktemp("edit"), steps=2)


def test_inpaint_command(run_dir, tmp_path, capsys):
    out = tmp_path / "inp"
    assert main(["inpaint", str(run_dir), "--image", "digits:3,5", "--mask", "center", "--steps", "6", "--jump",
                 "2", "--resample", "2", "--n", "3", "--batch-size", "4", "--out", str(out)]) == 0
    assert (out / "inpaint.png").is_file() and len(list(out.glob("inpainted_*.png"))) == 6
    printed = capsys.readouterr().out
    assert "6 inpaintings" in printed and f"{repaint_model_calls(6, 2, 2)} network calls" in printed
    # the known pixels of each written file are the input's
    x, _, _ = load_images("digits:3", (1, 8, 8))
    m = make_mask("center", (8, 8))[0, 0].numpy()
    got = np.asarray(Image.open(out / "inpainted_000_00000.png"))
    assert np.array_equal(got[m], to_uint8(x)[0, 0].numpy()[m])


def test_edit_command(run_dir, tmp_path, capsys):
    out = tmp_path / "ed"
    assert main(["edit", str(run_dir), "--image", "digits:3", "--strength", "0,0.5,1", "--sampler", "ddim",
                 "--steps", "4", "--n", "2", "--out", str(out)]) == 0
    assert (out / "sdedit.png").is_file() and len(list(out.glob("edit_*.png"))) == 6
    x, _, _ = load_images("digits:3", (1, 8, 8))
    assert np.array_equal(np.asarray(Image.open(out / "edit_s0_000_00000.png")), to_uint8(x)[0, 0].numpy())


@pytest.mark.parametrize("command, target", [("inpaint", "repaint"), ("edit", "sdedit")])
def test_an_edit_failing_midway_leaves_no_empty_folder(run_dir, tmp_path, capsys, monkeypatch, command, target):
    import ddpmkit.edit.commands as commands
    from ddpmkit.errors import DdpmkitError

    def broken(*a, **k):
        raise DdpmkitError("the chain failed")

    monkeypatch.setattr(commands, target, broken)
    out = tmp_path / "edits" / "x"
    extra = ["--mask", "center", "--steps", "4"] if command == "inpaint" else ["--strength", "0.5"]
    assert main([command, str(run_dir), "--image", "digits:3", "--n", "1", "--out", str(out)] + extra) == 2
    assert "the chain failed" in capsys.readouterr().err
    assert not (tmp_path / "edits").exists()


@pytest.mark.parametrize("argv, message", [
    (["inpaint", "--image", "digits:3", "--mask", "bottom-half", "--jump", "0"], "--jump"),
    (["inpaint", "--image", "digits:3", "--mask", "nowhere.png"], "no such file"),
    (["inpaint", "--image", "digits:99999", "--mask", "center"], "index 99999"),
    (["edit", "--image", "digits:3", "--strength", "1.5"], "strength"),
    (["edit", "--image", "digits:3", "--strength", "0.5", "--sampler", "nope"], "unknown sampler"),
])
def test_command_errors_are_one_line(run_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert main([argv[0], str(run_dir), *argv[1:], "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()


class ZeroNoise(PerSampleNoise):
    """Every draw zero: the chain's known pixels are then exactly sqrt(alpha_bar) x0 at each level."""

    def initial(self, shape, device=None):
        return torch.zeros(tuple(shape))


def test_known_pixels_are_renoised_to_the_level_just_reached():
    T, S = 100, 10
    sched = NoiseSchedule.linear(T)
    tau = timesteps(T, S, "uniform")
    den = Denoiser(lambda x, t: torch.zeros_like(x), sched, clip_x0=False)
    x0 = torch.full((2, 1, 2, 2), 0.7)
    mask = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
    seen = []
    repaint(den, x0, mask, steps=S, jump=3, resample=2, noise=ZeroNoise(0),
            callback=lambda k, t, x, x0_hat: seen.append((t, x[..., 0, 0].clone())))
    ab = sched.alpha_bar.double()
    where = {int(t): i for i, t in enumerate(tau)}
    for t, known in seen:
        i = where[t]
        # DDPM eq. 4 with eps = 0, at the level below the timestep just denoised (x0 itself after the last)
        want = 0.7 * (math.sqrt(ab[tau[i - 1]].item()) if i > 0 else 1.0)
        torch.testing.assert_close(known, torch.full_like(known, want), rtol=0, atol=1e-6)
    assert len(seen) == repaint_model_calls(S, 3, 2)


def test_report_shows_the_edits_of_a_run(run_dir):
    from ddpmkit.viz.report import write_report

    assert main(["inpaint", str(run_dir), "--image", "digits:1", "--mask", "left-half", "--steps", "3",
                 "--n", "2"]) == 0
    assert main(["edit", str(run_dir), "--image", "digits:1", "--strength", "0.5,1", "--steps", "3", "--n", "1"]) == 0
    assert len(list((run_dir / "edits").glob("*/inpaint.png"))) == 1
    page = write_report(run_dir).read_text()
    assert "<h2>Editing</h2>" in page and page.count("edits/") >= 2


# ---------------------------------------------------------------------------------------------- class-conditional
@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    from conftest import tiny_run

    return tiny_run(tmp_path_factory.mktemp("edit-cond"), class_cond=True, steps=2, num_samples=0)


@pytest.fixture
def labels_seen(monkeypatch):
    """The labels y of every call of the U-Net."""
    from ddpmkit.models.unet import UNet

    seen, forward = [], UNet.forward

    def spy(self, x, t, y=None):
        seen.append(None if y is None else y.tolist())
        return forward(self, x, t, y)

    monkeypatch.setattr(UNet, "forward", spy)
    return seen


INPAINT = ["--mask", "bottom-half", "--steps", "3", "--jump", "1", "--resample", "1"]
EDIT = ["--strength", "1", "--steps", "2"]


def test_inpaint_takes_each_digit_its_own_label(cond_run, tmp_path, capsys, labels_seen):
    # digits 17 and 0 are a 7 and a 0; rows 7, 7 | 0, 0 in batches of 3: [7, 7, 0] then [0]
    assert main(["inpaint", str(cond_run), "--image", "digits:17,0", *INPAINT, "--n", "2", "--batch-size", "3",
                 "--guidance", "0", "--out", str(tmp_path / "own")]) == 0
    assert labels_seen == [[7, 7, 0]] * 3 + [[0]] * 3
    assert "conditioned on each image's own label, guidance w = 0" in capsys.readouterr().out
    labels_seen.clear()
    # the default guidance doubles each batch: the labels, then the null class (10)
    assert main(["inpaint", str(cond_run), "--image", "digits:17", *INPAINT, "--n", "1"]) == 0
    assert labels_seen == [[7, 10]] * 3
    assert f"-w{DEFAULT_GUIDANCE:g}-seed0" in capsys.readouterr().out  # RUN/edits/inpaint-...-w<default>-seed0


def test_inpaint_and_edit_with_class_none_use_the_null_label(cond_run, tmp_path, capsys, labels_seen):
    assert main(["inpaint", str(cond_run), "--image", "digits:17", *INPAINT, "--n", "2", "--class", "none",
                 "--out", str(tmp_path / "none")]) == 0
    assert labels_seen == [[10, 10]] * 3
    labels_seen.clear()
    assert main(["edit", str(cond_run), "--image", "digits:17", *EDIT, "--n", "2", "--class", "none"]) == 0
    assert labels_seen == [[10, 10]] * 2
    printed = capsys.readouterr().out
    assert "null class" in printed and "-classnone-seed0" in printed


def test_edit_with_one_class_for_every_image(cond_run, tmp_path, capsys, labels_seen):
    assert main(["edit", str(cond_run), "--image", "digits:17,0", *EDIT, "--n", "1", "--class", "3",
                 "--guidance", "1"]) == 0
    assert labels_seen == [[3, 3, 10, 10]] * 2
    assert "-class3-w1-seed0" in capsys.readouterr().out


def test_an_image_file_without_a_label_takes_the_null_class(cond_run, tmp_path, labels_seen):
    Image.fromarray(np.full((8, 8), 90, np.uint8), "L").save(tmp_path / "img.png")
    assert main(["inpaint", str(cond_run), "--image", str(tmp_path / "img.png"), *INPAINT, "--n", "1",
                 "--out", str(tmp_path / "f")]) == 0
    assert labels_seen == [[10]] * 3


def _no_null_copy(run, dest):
    import json
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("edits"))
    config = json.loads((dest / "config.json").read_text())
    del config["classes"]  # as an imported model: labels unnamed, no null class known
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("argv, message", [
    (["inpaint", "COND", "--class", "none", "--guidance", "1"], "nothing to guide"),
    (["edit", "COND", "--class", "none", "--guidance", "1"], "nothing to guide"),
    (["inpaint", "COND", "--class", "3,5"], "one class"),
    (["edit", "COND", "--class", "12"], "no class '12'"),
    (["edit", "COND", "--guidance", "-1"], "--guidance must be a number >= 0"),
    (["inpaint", "FILE", "NO-NULL"], "pass --class K"),
    (["edit", "NO-NULL", "--class", "none"], "no null class"),
    (["inpaint", "UNCOND", "--class", "3"], "unconditional"),
    (["edit", "UNCOND", "--class", "none"], "unconditional"),
    (["edit", "UNCOND", "--guidance", "1"], "unconditional"),
])
def test_conditioning_errors_are_one_line(run_dir, cond_run, tmp_path, capsys, argv, message):
    cmd, rest = argv[0], argv[1:]
    run = run_dir if "UNCOND" in rest else cond_run
    if "NO-NULL" in rest:
        run = _no_null_copy(cond_run, tmp_path / "nonull")
    image = "digits:17"
    if "FILE" in rest:
        Image.fromarray(np.full((8, 8), 90, np.uint8), "L").save(tmp_path / "img.png")
        image = str(tmp_path / "img.png")
    rest = [a for a in rest if a not in ("COND", "UNCOND", "NO-NULL", "FILE")]
    out = tmp_path / "never"
    assert main([cmd, str(run), "--image", image, *(INPAINT if cmd == "inpaint" else EDIT), *rest,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err, err
    assert not out.exists()
