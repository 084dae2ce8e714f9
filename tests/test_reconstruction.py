"""Tests of the autoencoder's reconstruction measures (ddpmkit/metrics/reconstruction.py): PSNR against a hand
computation, reconstruction through stub models, the figure's size and layout, and the Frechet distance of the
reconstructions' digits features to the originals'."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.errors import DataError
from ddpmkit.images import from_uint8, to_uint8
from ddpmkit.metrics import reconstruction as R


class _Posterior:
    def __init__(self, z):
        self.z = z

    def mode(self):
        return self.z


class Identity:
    """An autoencoder that reconstructs exactly: encode to a posterior whose mode is x, decode z -> z."""

    def encode(self, x):
        return _Posterior(x)

    def decode(self, z):
        return z


class Noisy(Identity):
    """Decodes with Gaussian noise of scale ``sigma`` from its own seeded generator."""

    def __init__(self, sigma, seed=0):
        self.sigma, self.gen = sigma, torch.Generator().manual_seed(seed)

    def decode(self, z):
        return z + self.sigma * torch.randn(z.shape, generator=self.gen)


def _images(n=12, c=3, side=8, seed=0):
    return torch.randint(0, 256, (n, c, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1  # a constant error of 0.1: MSE 0.01
    y[1, :, :2] = 0.2  # half the values off by 0.2: MSE 0.02
    got = R.psnr(x, y)
    assert got.shape == (2,) and got.dtype == torch.float32
    assert got.tolist() == pytest.approx([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.02)], rel=1e-6)
    assert float(R.psnr(x, y)[0]) == pytest.approx(26.0206, abs=1e-4)
    # both clamped to [-1, 1]: 3 -> 1 against 0 is an error of 1 everywhere (MSE 1, 10 log10 4 = 6.02 dB)
    assert float(R.psnr(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 3.0))) == pytest.approx(10 * math.log10(4))
    assert R.psnr(x, x).tolist() == [R.PSNR_CAP_DB] * 2  # finite, at the cap
    tiny = x + 1e-7
    assert float(R.psnr(x, tiny)[0]) == R.PSNR_CAP_DB  # never above the cap
    with pytest.raises(ValueError):
        R.psnr(x, x[:1])


def test_reconstruct_with_an_identity_model_reaches_the_cap():
    imgs = _images()
    out = R.reconstruct(Identity(), imgs, batch_size=5)
    assert out.dtype == torch.float32 and out.shape == imgs.shape
    assert torch.equal(to_uint8(out), imgs)
    rep = R.evaluate_reconstruction(Identity(), imgs, batch_size=5)
    assert rep.psnr == R.PSNR_CAP_DB and rep.psnr_std == 0.0 and rep.n == 12
    assert rep.fd is None and rep.fd_stderr is None and rep.features is None and rep.seconds >= 0
    assert set(rep.as_dict()) >= {"psnr", "psnr_std", "n", "fd", "fd_stderr", "seconds"}


def test_reconstruct_batches_clamps_and_restores_training_mode():
    class Module(torch.nn.Module):
        def encode(self, x):
            assert not self.training  # evaluated in eval mode
            return _Posterior(x)

        def decode(self, z):
            return 3 * z  # beyond [-1, 1]: clamped

    m = Module().train()
    imgs = _images(7)
    a, b = R.reconstruct(m, imgs, batch_size=2), R.reconstruct(m, imgs, batch_size=64)
    assert m.training and torch.equal(a, b)
    assert torch.equal(a, (3 * from_uint8(imgs)).clamp(-1, 1))
    rep = R.evaluate_reconstruction(Noisy(0.1), imgs)
    assert 10 * math.log10(4 / 0.01) - 1.5 < rep.psnr < 10 * math.log10(4 / 0.01) + 1.5  # noise of MSE ~ 0.01
    with pytest.raises(DataError, match="uint8"):
        R.reconstruct(Identity(), from_uint8(imgs))


def test_reconstruct_reads_the_mean_of_a_posterior_without_mode():
    class Gaussian:
        def __init__(self, x):
            self.mean, self.logvar = x, torch.zeros_like(x)

    class Model(Identity):
        def encode(self, x):
            return Gaussian(x)

    imgs = _images(3)
    assert torch.equal(R.reconstruct(Model(), imgs), from_uint8(imgs))


def test_figure_size_and_layout(tmp_path):
    imgs = _images(10, c=3, side=8)
    recon = from_uint8(255 - imgs)
    path = R.save_reconstruction_figure(imgs, recon, tmp_path / "fig" / "recon.png", n=10, columns=4)
    assert path.is_file()
    pic = np.asarray(Image.open(path))
    s, pad, rows = 8, 2, 3  # 8x8 tiles are upscaled 8x (viz.grids.default_scale); ceil(10 / 4) rows of each
    tile = 8 * s
    assert pic.shape == (2 * rows * (tile + pad) + pad, 4 * (tile + pad) + pad, 3)
    first = pic[pad:pad + tile:s, pad:pad + tile:s]  # the top-left tile, one pixel per image pixel
    assert np.array_equal(first, imgs[0].permute(1, 2, 0).numpy())
    y = pad + rows * (tile + pad)  # the reconstructions start below the originals' rows
    assert np.array_equal(pic[y:y + tile:s, pad:pad + tile:s], (255 - imgs[0]).permute(1, 2, 0).numpy())
    assert (pic[pad + 2 * (tile + pad):, pad + 2 * (tile + pad):][:tile] == 255).all()  # the empty places: white
    grey = R.save_reconstruction_figure(_images(20, c=1), _images(20, c=1, seed=1), tmp_path / "g.png")
    assert Image.open(grey).mode == "L" and Image.open(grey).size == (8 * (64 + 2) + 2, 4 * (64 + 2) + 2)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from ddpmkit.metrics.digits import DigitsClassifier

    # five epochs, as test_digits.py: a few seconds, > 95% held out, features of a useful scale
    return DigitsClassifier.load_or_train(epochs=5, cache_dir=tmp_path_factory.mktemp("judge"))


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_noise(classifier):
    from ddpmkit.metrics.digits import real_digits

    imgs = real_digits()[0][:150]
    same = R.evaluate_reconstruction(Identity(), imgs, features=classifier, batch_size=64)
    assert same.features == "digits" and same.fd == pytest.approx(0.0, abs=1e-6)
    fds = [R.evaluate_reconstruction(Noisy(s), imgs, features=classifier).fd for s in (0.1, 0.3, 0.6)]
    assert 0.01 < fds[0] < fds[1] < fds[2]
    rep = R.evaluate_reconstruction(Noisy(0.3), imgs, features=classifier)
    assert rep.fd_stderr is not None and 0 < rep.fd_stderr < rep.fd
    assert rep.psnr < same.psnr


def test_without_a_feature_network_there_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))  # no Inception file there
    lines = []
    rep = R.evaluate_reconstruction(Identity(), _images(4), features="cifar10", log=lines.append)
    assert rep.fd is None and rep.features is None
    assert "no feature network for cifar10" in rep.note and "\n" not in rep.note and len(lines) == 1
    assert R.feature_network(None) is None and R.feature_network("folder/of/images") is None
