"""The variational bound and Gamma_t of a latent diffusion run: computed on the encoded, scaled latents, with a
continuous Gaussian decoder term L_0 (ddpmkit.metrics.nll, ddpmkit.gamma, `ddpmkit eval nll|variance`)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from ddpmkit.metrics import nll as E

torch.set_num_threads(1)

LN2 = math.log(2.0)
T = 30


def hand_neg_log_density_bits(x, mu, var) -> float:
    """-log2 N(x; mu, var) averaged over the elements of flat lists, one element at a time."""
    total = 0.0
    for xi, mi, vi in zip(x, mu, var):
        density = math.exp(-(xi - mi) ** 2 / (2.0 * vi)) / math.sqrt(2.0 * math.pi * vi)
        total += -math.log(density)
    return total / len(x) / LN2


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A tiny latent run: an f = 2 autoencoder with 2 latent channels (8x8 digits -> 2x4x4 latents), a U-Net on
    its latents trained a few steps at a large learning rate (so that its output is far from zero), raw weights
    as the EMA's."""
    from ddpmkit.cli import main

    root = tmp_path_factory.mktemp("latent-nll")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPMKIT_CACHE", str(root / "cache"))
        assert main(["autoencoder", "train", "--image-size", "8", "--factor", "2", "--latent-channels", "2",
                     "--base-channels", "8", "--num-groups", "4", "--no-mid-attention", "--steps", "3",
                     "--batch-size", "8", "--num-samples", "0", "--sample-every", "1000", "--eval-every", "0",
                     "--out", str(root / "ae"), "--quiet"]) == 0
        assert main(["train", "--autoencoder", str(root / "ae"), "--image-size", "8", "--base-channels", "8",
                     "--num-groups", "4", "--channel-mults", "1,2", "--num-res-blocks", "1", "--T", str(T),
                     "--sample-steps", "5", "--steps", "4", "--lr", "0.02", "--warmup", "0", "--ema-decay", "0",
                     "--batch-size", "8", "--sample-every", "1000", "--num-samples", "0",
                     "--out", str(root / "lat"), "--quiet"]) == 0
    return root / "lat"


def digits(n: int):
    from ddpmkit.data import load_dataset

    return load_dataset("digits", image_size=8, channels=1, progress=False).images[:n]


def encoded(run, images, batch_size: int):
    """The run's latents of uint8 images, encoded batch by batch."""
    from ddpmkit.images import from_uint8

    space = run.latent_space()
    return torch.cat([space.encode(from_uint8(images[i:i + batch_size]))
                      for i in range(0, images.shape[0], batch_size)])


# ------------------------------------------------------------------------------------------ the decoder term
def test_continuous_decoder_term_is_the_gaussian_log_density_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    mu = x + 0.3 * torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    log_var = torch.tensor([math.log(0.04), math.log(2.5)], dtype=torch.float64).reshape(2, 1, 1, 1)
    var = log_var.exp().expand_as(x)
    # elementwise, in nats
    ll = E.gaussian_log_likelihood(x, mu, log_var)
    for xi, mi, vi, li in zip(x.flatten().tolist(), mu.flatten().tolist(), var.flatten().tolist(),
                              ll.flatten().tolist()):
        assert li == pytest.approx(-hand_neg_log_density_bits([xi], [mi], [vi]) * LN2, rel=1e-12)
    # per image, the mean over its dimensions in bits; log_var broadcasts over them
    got = E.continuous_decoder_bits(x, mu, log_var)
    for b in range(2):
        want = hand_neg_log_density_bits(x[b].flatten().tolist(), mu[b].flatten().tolist(),
                                         var[b].flatten().tolist())
        assert float(got[b]) == pytest.approx(want, rel=1e-12)
    # a density, not a probability: a sharp decoder near its data has a negative L_0
    sharp = E.continuous_decoder_bits(x, x + 1e-3, torch.full((2, 1, 1, 1), math.log(1e-4), dtype=torch.float64))
    assert (sharp < 0).all()


@pytest.mark.parametrize("variance", ["small", "large"])
def test_latent_decoder_term_of_a_run_by_hand(latent_run, variance):
    """Column 0 of the latent bound: z_1 from the given noise, the U-Net's eps, x0_hat, and -log2 N(z_0; x0_hat,
    sigma_1^2) with sigma_1^2 from the betas, all by hand."""
    from ddpmkit.run import Run

    run = Run.open(latent_run)
    z = encoded(run, digits(2), 2)
    assert z.shape == (2, 2, 4, 4)
    noise = torch.randn(T, *z.shape, generator=torch.Generator().manual_seed(3))
    den = run.denoiser(variance=variance)
    got = E.bpd_terms(den, z, noise=noise, decoder="continuous")[:, 0]

    b = run.schedule.betas.double().tolist()
    ab0, ab1 = 1.0 - b[0], (1.0 - b[0]) * (1.0 - b[1])
    z1 = math.sqrt(ab0) * z + math.sqrt(1.0 - ab0) * noise[0]              # DDPM eq. 4 at t = 1
    with torch.no_grad():
        eps = run.load_model()(z1, torch.zeros(2, dtype=torch.long)).double()
    x0_hat = (z1.double() - math.sqrt(1.0 - ab0) * eps) / math.sqrt(ab0)
    # at t = 1 the posterior mean is x0_hat itself (DDPM eq. 7: coefficient 1 on x_0, 0 on x_1)
    # sigma_1^2 = beta_tilde_2 for both fixed variances: small clips log beta_tilde_1 = log 0 to it, and large uses
    # it in place of beta_1 at the decoder, as the official DDPM code does
    var = b[1] * (1.0 - ab0) / (1.0 - ab1)
    for i in range(2):
        want = hand_neg_log_density_bits(z[i].flatten().tolist(), x0_hat[i].flatten().tolist(),
                                         [var] * z[i].numel())
        assert float(got[i]) == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------------------------------ the whole bound
def test_latent_bound_differs_from_the_pixel_code_on_the_same_latents_only_in_L0(latent_run):
    from ddpmkit.run import Run

    run = Run.open(latent_run)
    den = run.denoiser()
    z = encoded(run, digits(2), 2)
    noise = torch.randn(T, *z.shape, generator=torch.Generator().manual_seed(5))
    latent = E.bpd_terms(den, z, noise=noise, decoder="continuous")
    pixel = E.bpd_terms(den, z, noise=noise)  # the pixel code, fed the latents as if they were images
    assert latent.shape == (2, T + 1)
    assert torch.equal(latent[:, 1:], pixel[:, 1:])  # L_1 .. L_{T-1} and the prior L_T
    assert not torch.allclose(latent[:, 0], pixel[:, 0])

    # evaluate_nll encodes the run's images batch by batch and computes the same, with its own noise stream
    res = E.evaluate_nll(latent_run, n=4, batch_size=2, seed=0)
    z4 = encoded(run, digits(4), 2)
    ref = E.nll_bpd(den, z4, batch_size=2, seed=0)
    ref_c = E.nll_bpd(den, z4, batch_size=2, seed=0, decoder="continuous")
    assert res["terms"][1:] == pytest.approx(ref["terms"][1:], rel=1e-6)
    assert res["terms"][0] == pytest.approx(ref_c["terms"][0], rel=1e-6)
    assert res["terms"][0] != pytest.approx(ref["terms"][0], rel=1e-3)
    assert res["bpd"] == pytest.approx(ref_c["bpd"], rel=1e-6)
    assert res["space"] == "latent" and res["decoder"] == "continuous" and res["latent_shape"] == [2, 4, 4]
    assert res["unit"] == "bits per latent dimension" and "not comparable with pixel bits/dim" in res["space_note"]
    # the change of variables to the unscaled posterior means, by hand: the run's scale is one number
    scale = json.loads((latent_run / "config.json").read_text())["latent"]["scale"]
    D = 2 * 4 * 4
    assert res["unscaled"]["log_det_nats"] == pytest.approx(-D * math.log(scale), rel=1e-6)
    assert res["unscaled"]["nats"] == pytest.approx(res["bpd"] * D * LN2 - D * math.log(scale), rel=1e-6)


def test_unscaled_nats_with_a_scale_per_channel_by_hand():
    # 3 channels of 2x5: -log p(m) = -log p(z) - sum over the 30 dimensions of log scale_c
    got = E.unscaled_nats(1.5, [0.5, 2.0, 4.0], (3, 2, 5))
    log_det = -10 * (math.log(0.5) + math.log(2.0) + math.log(4.0))
    assert got["log_det_nats"] == pytest.approx(log_det, rel=1e-12)
    assert got["nats"] == pytest.approx(1.5 * 30 * LN2 + log_det, rel=1e-12)
    assert got["nats_per_dim"] == pytest.approx(got["nats"] / 30, rel=1e-12)
    assert E.unscaled_nats(1.5, 2.0, (3, 2, 5))["log_det_nats"] == pytest.approx(-30 * math.log(2.0))
    with pytest.raises(ValueError, match="one per latent channel"):
        E.unscaled_nats(1.5, [1.0, 2.0], (3, 2, 5))


class IdentitySpace:
    """A stand-in latent space whose encoder and decoder are the identity (and whose scale is 2)."""

    def __init__(self):
        self.scale, self.shift, self.encoded = torch.tensor([2.0]), torch.tensor([0.0]), []

    def to(self, device):
        return self

    def encode(self, x):
        self.encoded.append(x.clone())
        return x

    def decode(self, z):
        return z


def _pixel_and_latent_copies(tmp_path):
    """A tiny pixel run with random (nonzero) weights, and the same run declared latent with 1x8x8 latents."""
    from ddpmkit.models import UNet
    from ddpmkit.store import save_checkpoint, write_config
    from ddpmkit.train import TrainConfig

    config = TrainConfig(T=T, base_channels=8, channel_mults=(1,), num_res_blocks=1, image_size=8,
                         num_groups=4).to_json()
    model = UNet.from_config(config["model"])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    pixel, latent = tmp_path / "pixel", tmp_path / "latent"
    for d, cfg in ((pixel, config), (latent, {**config, "latent": {"scale": 2.0, "shift": 0.0, "shape": [1, 8, 8],
                                                                     "image_shape": [1, 8, 8]}})):
        d.mkdir()
        write_config(d, cfg)
        save_checkpoint(d, 1, model_state=model.state_dict(), ema_state=model.state_dict())
    return pixel, latent


def test_the_latent_path_encodes_with_the_run_s_latent_space(tmp_path, monkeypatch):
    """With an identity encoder the prior and middle terms are the pixel bound's on the same images (with no
    clipping of x0_hat, as a latent run has none); only L_0 differs."""
    from ddpmkit.run import Run

    pixel, latent = _pixel_and_latent_copies(tmp_path)
    run = Run.open(latent)
    space = IdentitySpace()
    monkeypatch.setattr(run, "latent_space", lambda: space)
    assert run.is_latent and run.pixel_shape == (1, 8, 8)
    res = E.evaluate_nll(run, n=3, batch_size=2, seed=0)
    ref = E.evaluate_nll(pixel, n=3, batch_size=2, seed=0, clip_x0=False)
    assert [tuple(x.shape) for x in space.encoded] == [(2, 1, 8, 8), (1, 1, 8, 8)]  # every batch, once
    from ddpmkit.images import from_uint8

    assert torch.equal(torch.cat(space.encoded), from_uint8(digits(3)))
    assert res["terms"][1:] == pytest.approx(ref["terms"][1:], rel=1e-6)
    assert res["terms"][0] != pytest.approx(ref["terms"][0], rel=1e-3)
    assert res["space"] == "latent" and ref["space"] == "pixel" and ref["decoder"] == "discretized"
    # the stand-in's scale 2 over 64 dimensions
    assert res["unscaled"]["nats"] == pytest.approx(res["bpd"] * 64 * LN2 - 64 * math.log(2.0), rel=1e-9)


# ------------------------------------------------------------------------------------------ the commands
def test_eval_nll_command_names_the_latent_space(latent_run, tmp_path, capsys):
    from ddpmkit.cli import main

    out = tmp_path / "ev"
    assert main(["eval", "nll", str(latent_run), "--n", "2", "--batch-size", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    line = next(s for s in text.splitlines() if s.startswith("NLL bound:"))
    assert ("bits per latent dimension (a bound on the density of the scaled latents, not comparable with pixel "
            "bits/dim)") in line and "encoded into 2x4x4 latents" in line and "bits/dim on" not in line
    assert "not a likelihood of the images" in text and "unscaled posterior means" in text
    notes = json.loads((out / "nll_terms.json").read_text())
    assert notes["space"] == "latent" and notes["unit"] == "bits per latent dimension"
    assert "scaled latents" in notes["space_note"] and "\n" not in notes["space_note"]
    rows = (out / "nll_terms.csv").read_text().splitlines()
    assert rows[0] == "t,bits_per_latent_dim" and len(rows) == T + 2
    assert sum(float(r.split(",")[1]) for r in rows[1:]) == pytest.approx(notes["bpd"], rel=1e-5)
    assert (out / "nll_terms.png").is_file()


def test_eval_variance_on_latents_and_analytic_sampling(latent_run, tmp_path, capsys):
    from PIL import Image

    from ddpmkit.cli import main
    from ddpmkit.diffusion.variance import estimate_gamma
    from ddpmkit.run import GAMMA_FILE, Run

    run_dir = tmp_path / "lat"
    shutil.copytree(latent_run, run_dir)  # the module's run stays without Gamma_t
    assert main(["eval", "variance", str(run_dir), "--n", "6", "--batch-size", "4"]) == 0
    assert "encoded into the run's latents" in capsys.readouterr().out
    run = Run.open(run_dir)
    assert (run_dir / GAMMA_FILE).is_file() and run.config["diffusion"]["analytic"]["space"] == "latent"
    # Gamma_t by hand: the network's eps on the latents of the same images, in the same batches and noise
    z = encoded(run, digits(6), 4)
    want, used = estimate_gamma(run.denoiser(variance="small"), [z[:4], z[4:]], seed=0)
    assert used == 6 and torch.allclose(run.gamma(), want, rtol=1e-5, atol=1e-9)
    assert float(want.min()) > 0.01  # the network's eps is far from zero: the test tells latents from images
    for sampler in (None, "ddpm"):
        out = tmp_path / f"samples-{sampler}"
        extra = [] if sampler is None else ["--sampler", sampler]
        assert main(["sample", str(run_dir), "--variance", "analytic", "--steps", "5", "--n", "2", "--out", str(out),
                     *extra]) == 0
        assert "estimating it now" not in capsys.readouterr().err  # the stored Gamma_t
        pngs = sorted(out.glob("sample_*.png"))
        assert len(pngs) == 2 and Image.open(pngs[0]).size == (8, 8)  # decoded into images
