"""Inpainting and SDEdit on a latent diffusion run: the pixel mask on the latent grid against masks reduced by hand,
the known pixels pasted back exactly, an identity autoencoder giving exactly the pixel path's results, the commands
writing pixels, and a mask that does not fit refused in one line.

The latent run is tiny (an f = 2 autoencoder of 8x8 digits into 2x4x4 latents, a U-Net over them, a few steps
each): its pictures mean nothing, its shapes and its bookkeeping are what is tested.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.edit import EditError, latent_factor, latent_mask, load_images, make_mask, paste_known
from ddpmkit.edit.commands import edit_run, inpaint_run
from ddpmkit.images import from_uint8, to_uint8
from ddpmkit.run import Run

SIZE, F = 8, 2

# the tiny nets: an f = 2 autoencoder (channels 8, 16) and a two-level U-Net over its 4x4 latents, T = 40
AE_FLAGS = ["--image-size", str(SIZE), "--factor", str(F), "--latent-channels", "2", "--base-channels", "8",
            "--layers-per-block", "1", "--num-groups", "4", "--steps", "3", "--batch-size", "8", "--num-samples",
            "0", "--eval-every", "0", "--sample-every", "1000", "--quiet"]
UNET_FLAGS = ["--image-size", str(SIZE), "--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
              "--num-groups", "4", "--T", "40", "--sample-steps", "5", "--batch-size", "8", "--steps", "2",
              "--sample-every", "1000", "--num-samples", "0", "--quiet"]
INPAINT = ["--steps", "4", "--jump", "2", "--resample", "2"]


def train_tiny_latent_run(root):
    """The tiny latent run in ``root``: the autoencoder in ``root/ae``, the latent U-Net in ``root/lat`` (returned)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPMKIT_CACHE", str(root / "cache"))  # the encoded data set's cache stays in the test's folder
        assert main(["autoencoder", "train", *AE_FLAGS, "--out", str(root / "ae")]) == 0
        assert main(["train", "--autoencoder", str(root / "ae"), *UNET_FLAGS, "--out", str(root / "lat")]) == 0
    return root / "lat"


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent-edit")
    run = Run.open(train_tiny_latent_run(root))
    assert run.is_latent and run.pixel_shape == (1, SIZE, SIZE) and run.image_shape == (2, SIZE // F, SIZE // F)
    return root / "lat"


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    from conftest import tiny_run

    return tiny_run(tmp_path_factory.mktemp("pixel-edit"), steps=2)


def _save_mask(path, known: np.ndarray):
    Image.fromarray(np.where(known, 255, 0).astype(np.uint8), "L").save(path)
    return str(path)


def _reduce_by_hand(known: np.ndarray, f: int) -> np.ndarray:
    """A cell is known when every pixel of its block is, counted with loops."""
    h, w = known.shape[0] // f, known.shape[1] // f
    out = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            out[i, j] = all(known[i * f + a, j * f + b] for a in range(f) for b in range(f))
    return out


# ---------------------------------------------------------------------------------------------- the mask
@pytest.mark.parametrize("f", [2, 4])
def test_a_cell_is_known_only_when_its_whole_block_is(f):
    full = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    assert latent_mask(full, f).shape == (1, 1, 8 // f, 8 // f) and latent_mask(full, f).all()
    one = full.clone()
    one[0, 0, 5, 2] = False  # one unknown pixel: its cell, and only its cell, is unknown
    want = torch.ones(1, 1, 8 // f, 8 // f, dtype=torch.bool)
    want[0, 0, 5 // f, 2 // f] = False
    assert torch.equal(latent_mask(one, f), want)
    for spec in ("center", "bottom-half", "random:0.1"):
        m = make_mask(spec, (8, 8), seed=3)
        assert np.array_equal(latent_mask(m, f)[0, 0].numpy(), _reduce_by_hand(m[0, 0].numpy(), f)), spec
    rgb = torch.ones(1, 3, 8, 8, dtype=torch.bool)
    rgb[0, 2, 0, 0] = False  # unknown in one channel: the cell is unknown for every latent channel
    assert not latent_mask(rgb, f)[0, 0, 0, 0] and int(latent_mask(rgb, f).sum()) == (8 // f) ** 2 - 1


def test_a_mask_or_a_run_that_does_not_divide_is_one_line():
    with pytest.raises(EditError, match="3x3 blocks"):
        latent_mask(torch.ones(1, 1, 8, 8, dtype=torch.bool), 3)
    assert latent_factor((1, 32, 32), (4, 8, 8)) == 4
    with pytest.raises(EditError, match="whole factor"):
        latent_factor((1, 32, 32), (4, 6, 6))


def test_paste_keeps_the_input_where_known_and_the_decoding_elsewhere():
    x = from_uint8(torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0)))
    decoded = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    m = make_mask("center", (8, 8))
    out = paste_known(x, m, decoded)
    k = m.expand_as(x)
    assert torch.equal(out[k], x[k]) and torch.equal(out[~k], decoded[~k])
    assert torch.equal(out, m * x + (~m) * decoded)  # the formula itself


# ---------------------------------------------------------------------------------------------- the latent run
def test_known_pixels_are_pasted_back_exactly_on_a_latent_run(latent_run, tmp_path, capsys):
    known = np.ones((SIZE, SIZE), bool)
    known[3:5, 3:6] = False  # a hole off the 2x2 grid: its 6 pixels touch 4 cells (rows 2-5, columns 2-5)
    mask = _save_mask(tmp_path / "mask.png", known)
    res = inpaint_run(latent_run, image="digits:3,5", mask=mask, n=2, steps=4, jump=2, resample=2,
                      out=tmp_path / "inp")
    lat = res["latent"]
    assert lat["factor"] == F and np.array_equal(lat["latent_mask"][0, 0].numpy(), _reduce_by_hand(known, F))
    assert lat["known_pixels"] == known.sum() and lat["regenerated_pixels"] == 4 * 4 - 6
    x, _, _ = load_images("digits:3,5", (1, SIZE, SIZE))
    u8 = to_uint8(x)
    for i in range(2):
        for k in range(2):
            got = np.asarray(Image.open(tmp_path / "inp" / f"inpainted_{i:03d}_{k:05d}.png"))
            assert got.shape == (SIZE, SIZE)
            assert np.array_equal(got[known], u8[i, 0].numpy()[known])
    assert lat["known_rms"] > 0  # the decoding missed the known pixels: the paste is what makes them exact


def test_inpaint_and_edit_commands_write_pixels(latent_run, tmp_path, capsys):
    out = tmp_path / "inp"
    assert main(["inpaint", str(latent_run), "--image", "digits:3", "--mask", "bottom-half", *INPAINT, "--n", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "latent run (f = 2)" in printed and "the seam at the mask's edge is the decoder's" in printed
    assert "pasted over the decoding" in printed
    files = sorted(out.glob("inpainted_*.png"))
    assert len(files) == 2 and all(Image.open(p).size == (SIZE, SIZE) and Image.open(p).mode == "L" for p in files)
    assert (out / "inpaint.png").is_file()

    out = tmp_path / "ed"
    assert main(["edit", str(latent_run), "--image", "digits:3", "--strength", "0,0.5,1", "--sampler", "ddim",
                 "--steps", "4", "--n", "2", "--out", str(out)]) == 0
    assert "autoencoder's reconstruction" in capsys.readouterr().out
    files = sorted(out.glob("edit_*.png"))
    assert len(files) == 6 and all(Image.open(p).size == (SIZE, SIZE) for p in files)
    assert (out / "sdedit.png").is_file()
    # strength 0 is the decoding of the encoded input: the autoencoder's reconstruction
    space = Run.open(latent_run).latent_space()
    x, _, _ = load_images("digits:3", (1, SIZE, SIZE))
    want = to_uint8(space.decode(space.encode(x)))[0, 0].numpy()
    got = np.asarray(Image.open(out / "edit_s0_000_00000.png"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # a rounding apart at most


@pytest.mark.parametrize("what, message", [
    ("latent-size mask", "4x4 pixels, the model's images are 8x8"),
    ("checkerboard", "no 2x2 block of the mask is wholly known"),
    ("latent-size image", "4x4 pixels, the model's images are 8x8"),
])
def test_a_mask_that_does_not_fit_a_latent_run_is_one_line(latent_run, tmp_path, capsys, what, message):
    image, mask = "digits:3", "center"
    if what == "latent-size mask":
        mask = _save_mask(tmp_path / "m.png", np.ones((SIZE // F, SIZE // F), bool))
    elif what == "checkerboard":
        mask = _save_mask(tmp_path / "m.png", (np.indices((SIZE, SIZE)).sum(0) % 2) == 0)
    else:
        Image.fromarray(np.zeros((SIZE // F, SIZE // F), np.uint8), "L").save(tmp_path / "img.png")
        image = str(tmp_path / "img.png")
    out = tmp_path / "never"
    assert main(["inpaint", str(latent_run), "--image", image, "--mask", mask, *INPAINT, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "Traceback" not in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- identity autoencoder
class IdentitySpace:
    """A stand-in latent space: f = 1, encode and decode the identity, scale 1."""

    scale, shift = torch.ones(1), torch.zeros(1)

    def encode(self, x):
        return x.clone()

    def decode(self, z):
        return z.float()

    def to(self, device):
        return self


class IdentityLatentRun(Run):
    """A pixel run seen as a latent run over the identity autoencoder: the same U-Net weights either way."""

    @property
    def is_latent(self) -> bool:
        return True

    def latent_space(self):
        return IdentitySpace()


def test_an_identity_autoencoder_gives_the_pixel_path_exactly(pixel_run, tmp_path):
    from ddpmkit.request import SampleOptions

    pixel, latent = Run.open(pixel_run), IdentityLatentRun.open(pixel_run)
    assert latent.is_latent and latent.pixel_shape == pixel.image_shape
    # a latent run's denoiser never clips x0; the pixel run is asked not to either, so both walk the same chain
    kw = dict(image="digits:3,5", mask="center", n=2, steps=6, jump=2, resample=2, batch_size=3, clip_x0=False)
    want = inpaint_run(pixel, out=tmp_path / "p", **kw)
    got = inpaint_run(latent, out=tmp_path / "l", **kw)
    assert want["latent"] is None and got["latent"]["factor"] == 1 and got["latent"]["regenerated_pixels"] == 0
    assert torch.equal(got["results"], want["results"])
    assert not torch.equal(want["results"], want["images"].repeat_interleave(2, 0))  # the hole was filled

    opt = SampleOptions(sampler="ddim", steps=4, n=2, batch_size=3, clip_x0=False, seed=5)
    want = edit_run(pixel, image="digits:3,5", strengths=[0, 0.5, 1], sample_options=opt, out=tmp_path / "pe")
    got = edit_run(latent, image="digits:3,5", strengths=[0, 0.5, 1], sample_options=opt, out=tmp_path / "le")
    assert got["latent"]["reconstruction_rms"] == 0
    for a, b in zip(got["edits"], want["edits"]):
        assert torch.equal(a, b)
