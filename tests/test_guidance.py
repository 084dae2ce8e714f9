"""Class-conditional models and classifier-free guidance against closed forms.

The oracle: two classes c in {0, 1}, equally likely, x0 | c ~ N(mu_c, s^2) in one dimension. Under DDPM eq. 4,
x_t | c ~ N(a mu_c, v) with a = sqrt(alpha_bar_t), v = a^2 s^2 + 1 - a^2, so the exact noise predictors are

    eps(x, c)    = E[eps | x_t = x, c] = sqrt(1 - a^2) (x - a mu_c) / v
    eps(x, null) = E[eps | x_t = x]    = sqrt(1 - a^2) (x - a mbar(x)) / v,  mbar(x) = sum_k r_k(x) mu_k,

with r_k(x) = p(c = k | x_t = x) the posterior class weights (the mixture's score, -(x - a mbar) / v). Guidance
(Ho & Salimans 2022 eq. 6) then gives

    eps_w(x, c) = sqrt(1 - a^2) (x - a mtilde(x)) / v,
    mtilde = (1 + w) mu_c - w mbar = mu_c + w r_c'(x) (mu_c - mu_c'),

the score of a Gaussian whose centre moves away from the other class c' by w r_c'(x) |mu_c - mu_c'|: at w = 0 the
class's own law, at w > 0 class means pushed apart. The reference law of the guided DDPM chain is computed here
independently of the library: the density on a fine grid, pushed through each Gaussian transition of the chain.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_cfg, tiny_flags, tiny_run
from ddpmkit.cli import main
from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.errors import ConfigError
from ddpmkit.models.unet import UNet
from ddpmkit.run import Run
from ddpmkit.samplers import SAMPLERS, sample, timesteps
from ddpmkit.request import Conditioning, SampleOptions, parse_classes
from ddpmkit.train import Trainer
from ddpmkit.train.trainer import uncond_mask

T = 1000
MU = (-0.5, 0.7)  # class means: close enough that the classes overlap at moderate noise, so guidance shows
S = 0.4  # class standard deviation
NULL = 2


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(T)


class Oracle:
    """The exact conditional (labels 0, 1) and unconditional (label NULL) noise predictors; counts its calls."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.calls = []

    def __call__(self, x, t, c):
        self.calls.append(x.shape[0])
        ab = self.schedule.alpha_bar_at(t).view(-1, 1, 1, 1).to(torch.float64)
        a, sig = ab.sqrt(), (1 - ab).sqrt()
        v = ab * S ** 2 + 1 - ab
        xd = x.double()
        mu = torch.tensor(MU, dtype=torch.float64)
        # posterior class weights r_k(x) of the two-Gaussian mixture at time t
        logp = torch.stack([-(xd - a * m) ** 2 / (2 * v) for m in MU])
        r = torch.softmax(logp, dim=0)
        mbar = (r * mu.view(2, 1, 1, 1, 1)).sum(0)
        cc = c.view(-1, 1, 1, 1)
        m = torch.where(cc == NULL, mbar, mu[cc.clamp(max=1)])
        return (sig * (xd - a * m) / v).float()


def draw(sched, label, w, n=10000, sampler="ddpm", steps=100, seed=0, oracle=None, **opts):
    net = oracle or Oracle(sched)
    den = Denoiser(net, sched, clip_x0=False).with_cond(torch.full((n,), label)).guided(w, NULL)
    x = sample(den, (n, 1, 1, 1), sampler=sampler, steps=steps, noise=torch.Generator().manual_seed(seed), **opts)
    return x.double().flatten()


def reference_law(sched, label, w, steps=100, L=6.0, N=1201):
    """Mean and std of the guided DDPM chain's output (respaced to ``steps``, beta_tilde variance), by pushing
    the density of x_T ~ N(0, 1) on a grid through every Gaussian transition of the chain. numpy, float64."""
    tau = timesteps(T, steps, "uniform")
    ab_all = sched.alpha_bar.double().numpy()
    ab = ab_all[tau]
    xs = np.linspace(-L, L, N)
    dx = xs[1] - xs[0]
    dens = np.exp(-xs ** 2 / 2) / math.sqrt(2 * math.pi)
    mu = np.array(MU)
    for i in range(len(tau) - 1, -1, -1):
        a_t, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)
        beta = 1 - a_t / a_prev  # Improved DDPM sec. 4: the respaced beta
        a, sig, v = math.sqrt(a_t), math.sqrt(1 - a_t), a_t * S ** 2 + 1 - a_t
        logp = np.stack([-(xs - a * m) ** 2 / (2 * v) for m in mu])
        r = np.exp(logp - logp.max(0))
        r /= r.sum(0)
        mbar = (r * mu[:, None]).sum(0)
        mtilde = (1 + w) * mu[label] - w * mbar  # the guided centre (module docstring)
        eps = sig * (xs - a * mtilde) / v
        x0 = (xs - sig * eps) / a  # DDPM eq. 4 solved for x0
        # DDPM eq. 7: the posterior mean of q(x_{t-1} | x_t, x0_hat) and beta_tilde
        mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * xs
        if i == 0:  # the last step returns the mean: push the density through x -> mean(x)
            m1 = (dens * mean).sum() * dx
            m2 = (dens * mean ** 2).sum() * dx
            return m1, math.sqrt(m2 - m1 ** 2)
        var = (1 - a_prev) / (1 - a_t) * beta
        kernel = np.exp(-(xs[:, None] - mean[None, :]) ** 2 / (2 * var))
        kernel /= kernel.sum(0, keepdims=True)  # each column: the law of x_{t-1} given x_t on the grid, mass 1
        dens = kernel @ dens


# ---------------------------------------------------------------------------------------------- the Denoiser
def test_guided_eps_is_eq6_from_one_doubled_batch(sched):
    net = Oracle(sched)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 1, 1, generator=g)
    t = torch.randint(0, T, (5,), generator=g)
    c = torch.tensor([0, 1, 0, 1, 1])
    base = Denoiser(net, sched, clip_x0=False)
    eps_c, eps_u = base(x, t, c).eps, base(x, t, torch.full((5,), NULL)).eps
    net.calls.clear()
    w = 2.5
    guided = base.guided(w, NULL)(x, t, c).eps
    assert net.calls == [10]  # one network call, conditional and null halves together
    torch.testing.assert_close(guided, (1 + w) * eps_c - w * eps_u, atol=1e-6, rtol=0)  # Ho & Salimans eq. 6
    # the closed form: the score of the Gaussian centred at mtilde = (1 + w) mu_c - w mbar
    ab = sched.alpha_bar.double()[t].view(-1, 1, 1, 1)
    a, v = ab.sqrt(), ab * S ** 2 + 1 - ab
    r = torch.softmax(torch.stack([-(x.double() - a * m) ** 2 / (2 * v) for m in MU]), 0)
    mbar = r[0] * MU[0] + r[1] * MU[1]
    mtilde = (1 + w) * torch.tensor(MU, dtype=torch.float64)[c].view(-1, 1, 1, 1) - w * mbar
    torch.testing.assert_close(guided.double(), (1 - ab).sqrt() * (x.double() - a * mtilde) / v, atol=1e-5, rtol=0)
    # w = 0 is the conditional model alone, in one undoubled call
    net.calls.clear()
    torch.testing.assert_close(base.guided(0.0, NULL)(x, t, c).eps, eps_c)
    assert net.calls == [5]


def test_guidance_in_eps_or_x0_agree_without_clipping_and_stay_in_range_with_it(sched):
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(64, 1, 1, 1, generator=g)
    t = torch.randint(0, T, (64,), generator=g)
    c = torch.randint(0, 2, (64,), generator=g)
    eps_space = Denoiser(Oracle(sched), sched, clip_x0=False).guided(3.0, NULL)
    x0_space = eps_space.guided(3.0, NULL, "x0")
    torch.testing.assert_close(eps_space(x, t, c).x0, x0_space(x, t, c).x0, atol=1e-4, rtol=1e-4)
    for den in (eps_space, x0_space):
        clipped = Denoiser(den.net, sched, clip_x0=True, guidance=3.0, null_cond=NULL,
                           guidance_space=den.guidance_space)(x, t, c)
        assert clipped.x0.abs().max() <= 1.0
        # eps_hat stays the noise consistent with x_t and the clipped x0_hat (DDPM eq. 4)
        ab = sched.alpha_bar[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(ab.sqrt() * clipped.x0 + (1 - ab).sqrt() * clipped.eps, x, atol=1e-4, rtol=0)


def test_guidance_refuses_what_it_cannot_do(sched):
    with pytest.raises(ValueError, match="null_cond"):
        Denoiser(Oracle(sched), sched, guidance=1.0)
    with pytest.raises(ValueError, match="finite"):
        Denoiser(Oracle(sched), sched, guidance=float("nan"), null_cond=NULL)


# ---------------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("label", [0, 1])
def test_w0_follows_the_chains_law(sched, label):
    x = draw(sched, label, 0.0)
    ref_mean, ref_std = reference_law(sched, label, 0.0)
    assert abs(x.mean().item() - ref_mean) < 4 * S / math.sqrt(x.numel())
    assert abs(x.std().item() - ref_std) < 0.03 * ref_std
    assert abs(ref_mean - MU[label]) < 0.01  # 100 respaced steps: the class mean, the spread a little short


@pytest.mark.slow
@pytest.mark.parametrize("label", [0, 1])
def test_w0_gives_each_class_its_law(sched, label):
    # all T = 1000 steps of DDPM: the chain's law is then the class's, N(mu_c, s^2), to within 1%
    x = draw(sched, label, 0.0, steps=T)
    ref_mean, ref_std = reference_law(sched, label, 0.0, steps=T)
    se = S / math.sqrt(x.numel())
    assert abs(ref_mean - MU[label]) < 0.01 * S and abs(ref_std - S) < 0.01 * S
    assert abs(x.mean().item() - MU[label]) < 4 * se
    assert abs(x.std().item() - S) < 0.02 * S


@pytest.mark.parametrize("w", [1.0, pytest.param(3.0, marks=pytest.mark.slow)])
def test_guided_class_means_separate_as_the_guided_score_says(sched, w):
    means = {}
    for label in (0, 1):
        x = draw(sched, label, w, seed=label)
        ref_mean, ref_std = reference_law(sched, label, w)
        se = x.std().item() / math.sqrt(x.numel())
        assert abs(x.mean().item() - ref_mean) < 4 * se, (label, x.mean().item(), ref_mean)
        assert abs(x.std().item() - ref_std) < 0.04 * ref_std
        means[label] = ref_mean
    # pushed away from the other class: by more than nothing, by less than w |mu_1 - mu_0| (since r_c' < 1)
    gap = MU[1] - MU[0]
    assert means[0] < MU[0] and means[1] > MU[1]
    assert means[1] - means[0] < gap * (1 + 2 * w)
    if w == 3.0:
        assert means[1] - means[0] > reference_law(sched, 1, 1.0)[0] - reference_law(sched, 0, 1.0)[0]


def test_the_reference_would_catch_a_wrong_weight(sched):
    # eps = w eps_c - (w - 1) eps_u (the weights of eq. 6 shifted by one) must fail the comparison above
    class Wrong(Oracle):
        def __call__(self, x, t, c):
            out = super().__call__(x, t, c)
            B = out.shape[0] // 2
            oc, ou = out[:B], out[B:]
            w = 2.0
            # the library's (1 + w) oc' - w ou is then w oc - (w - 1) ou
            return torch.cat([(w * oc + ou) / (1 + w), ou])

    x = draw(sched, 1, 2.0, oracle=Wrong(sched), n=5000)
    ref_mean, _ = reference_law(sched, 1, 2.0)
    assert abs(x.mean().item() - ref_mean) > 4 * S / math.sqrt(5000)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_guidance_works_with_every_sampler(sched, name):
    net = Oracle(sched)
    x0 = draw(sched, 1, 0.0, n=2000, sampler=name, steps=50, oracle=net)
    assert set(net.calls) == {2000}  # w = 0: undoubled
    net.calls.clear()
    x2 = draw(sched, 1, 2.0, n=2000, sampler=name, steps=50, oracle=net)
    assert set(net.calls) == {4000}  # guided: one doubled batch per evaluation
    assert abs(x0.mean().item() - MU[1]) < 0.08
    assert x2.mean().item() > x0.mean().item() + 0.05  # pushed away from class 0


# ---------------------------------------------------------------------------------------------- the U-Net
def test_unet_class_embedding_is_added_to_the_time_embedding():
    kw = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
              attention_resolutions=(), num_groups=4, dropout=0.0)
    torch.manual_seed(0)
    plain = UNet(**kw)
    assert "num_class_embeds" not in plain.config and plain.class_embed is None
    cond = UNet(**kw, num_class_embeds=3)
    with torch.no_grad():  # off the zero initialisation of the output layers
        for p in cond.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert cond.class_embed.weight.shape == (3, 32)
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"class_embed.weight"}
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    with pytest.raises(ValueError, match="needs class labels"):
        cond(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.tensor([0, 1]))
    # with a zero class embedding the output is the unconditional network's with the same weights
    with torch.no_grad():
        cond.class_embed.weight.zero_()
        state = {k: v for k, v in cond.state_dict().items() if k != "class_embed.weight"}
        plain.load_state_dict(state)
        torch.testing.assert_close(cond(x, t, torch.tensor([0, 2])), plain(x, t))
        cond.class_embed.weight.normal_()
        assert not torch.allclose(cond(x, t, torch.tensor([0, 0])), cond(x, t, torch.tensor([1, 1])))


# ---------------------------------------------------------------------------------------------- training
def test_null_label_draw_rate_and_its_stream():
    p, B, steps = 0.1, 64, 400
    drops = torch.stack([uncond_mask(7, s, B, p) for s in range(steps)])
    n = drops.numel()
    assert abs(drops.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    # a function of (seed, step) alone: the same again, different for another seed or step
    assert torch.equal(uncond_mask(7, 123, B, p), drops[123])
    assert not torch.equal(uncond_mask(8, 123, B, p), drops[123])
    assert not uncond_mask(7, 5, B, 0.0).any()


def test_training_drops_labels_to_the_null_class_as_drawn(tmp_path, monkeypatch):
    seen = []
    orig = UNet.forward

    def spy(self, x, t, y=None):
        seen.append(y.clone())
        return orig(self, x, t, y)

    monkeypatch.setattr(UNet, "forward", spy)
    cfg = tiny_cfg(class_cond=True, p_uncond=0.5, steps=4)
    tr = Trainer(cfg, tmp_path / "run", quiet=True)
    tr.run()
    assert len(seen) == 4
    for step, y in enumerate(seen):
        assert torch.equal(y == 10, uncond_mask(cfg.seed, step, cfg.batch_size, 0.5))


def test_class_conditional_resume_is_bit_exact(tmp_path):
    full = tiny_run(tmp_path, "full", class_cond=True, p_uncond=0.3, steps=6)
    part = tiny_run(tmp_path, "part", class_cond=True, p_uncond=0.3, steps=4)
    Trainer(tiny_cfg(class_cond=True, p_uncond=0.3, steps=6), part, resume=True, quiet=True).run()
    a, b = Run.open(full).load_model(), Run.open(part).load_model()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["classes"] == {"names": [str(k) for k in range(10)], "null": 10}
    assert cfg["model"]["num_class_embeds"] == 11 and cfg["train"]["class_cond"] is True
    run = Run.open(full)
    assert run.class_names == tuple(str(k) for k in range(10)) and run.null_class == 10


def test_an_unlabelled_source_with_class_cond_is_one_clear_error(tmp_path, capsys):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(flat / f"{i}.png")
    out = tmp_path / "run"
    rc = main(["train", "--data", str(flat), "--class-cond", "--out", str(out), "--steps", "1"]
              + tiny_flags())
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--class-cond needs labelled images" in err[0]
    assert not out.exists()


def test_p_uncond_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="p-uncond"):
        tiny_cfg(class_cond=True, p_uncond=1.0).validate()


# ---------------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("cond"), class_cond=True, steps=2, num_samples=0)


def test_class_specs():
    names = tuple("0123456789")
    assert parse_classes("7", names) == [7]
    assert parse_classes("3,5,8", names) == [3, 5, 8]
    assert parse_classes("all", names) == list(range(10))
    assert parse_classes("cat", ("dog", "cat")) == [1]
    for bad in ("10", "x", "-1"):
        with pytest.raises(ConfigError, match="no class"):
            parse_classes(bad, names)
    with pytest.raises(ConfigError, match="unconditional"):
        parse_classes("7", None)
    c = Conditioning.of(SampleOptions(classes="3,5"), names, 10, 6, grouped=True)
    assert c.labels.tolist() == [3, 3, 3, 5, 5, 5] and c.guidance > 0
    c = Conditioning.of(SampleOptions(), names, 10, 12, grouped=False)
    assert c.labels.tolist() == list(range(10)) + [0, 1] and c.classes is None


def test_sample_one_class_several_and_all(cond_run, tmp_path, capsys):
    from PIL import Image

    base = ["sample", str(cond_run), "--steps", "3", "--quiet"]
    assert main(base + ["--class", "7", "--n", "4", "--out", str(tmp_path / "seven")]) == 0
    labels = (tmp_path / "seven" / "labels.csv").read_text().splitlines()
    assert labels[1:] == [f"sample_{i:05d}.png,7,7" for i in range(4)]
    assert main(base + ["--class", "3,5,8", "--n", "2", "--guidance", "0",
                        "--out", str(tmp_path / "three")]) == 0
    assert len(list((tmp_path / "three").glob("sample_*.png"))) == 6
    assert main(base + ["--class", "all", "--n", "3", "--out", str(tmp_path / "all")]) == 0
    grid = Image.open(tmp_path / "all" / "grid.png")
    # ten rows of 8x8 tiles (scaled), and a label column left of them
    assert grid.height > 10 * 8 and grid.width > 3 * grid.height / 10
    out = capsys.readouterr().out
    assert "guidance w = 0," in out or "guidance w = 0)" in out


def test_a_sample_depends_on_its_class_not_on_its_batch(cond_run):
    run = Run.open(cond_run)
    den = run.denoiser(guidance=1.0)
    from ddpmkit.samplers.batches import sample_batches

    labels = torch.tensor([1, 7, 7, 3])
    one = torch.cat([x for _, x in sample_batches(den, n=4, shape=run.image_shape, steps=3, batch_size=4,
                                                  labels=labels)])
    two = torch.cat([x for _, x in sample_batches(den, n=4, shape=run.image_shape, steps=3, batch_size=1,
                                                  labels=labels)])
    torch.testing.assert_close(one, two, atol=1e-5, rtol=0)


def test_the_python_api_on_a_class_conditional_run_names_what_to_pass(cond_run):
    run = Run.open(cond_run)
    den = run.denoiser()
    shape = (3, *run.image_shape)
    with pytest.raises(ValueError, match=r"with_cond\(labels\).*guided\(w\).*null_class"):
        sample(den, shape, sampler="ddim", steps=3, noise=0)
    # one int label for all is labels [B] of that int; the null class is the unconditional model
    seven = sample(den.with_cond(7), shape, sampler="ddim", steps=3, noise=0)
    assert torch.equal(seven, sample(den.with_cond(torch.tensor([7, 7, 7])), shape, sampler="ddim", steps=3, noise=0))
    null = sample(den.with_cond(run.null_class), shape, sampler="ddim", steps=3, noise=0)
    assert not torch.equal(null, seven)
    guided = sample(den.with_cond(7).guided(1.0), shape, sampler="ddim", steps=3, noise=0)
    assert guided.shape == shape and not torch.equal(guided, seven)


def test_the_analytic_variance_refuses_guidance_in_one_line(cond_run, tmp_path, capsys):
    out = tmp_path / "a"
    rc = main(["sample", str(cond_run), "--sampler", "ddpm", "--steps", "2", "--variance", "analytic", "--quiet",
               "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "analytic" in err[0] and "--guidance 0" in err[0]
    assert not out.exists()
    with pytest.raises(ConfigError, match="analytic"):
        Run.open(cond_run).denoiser(variance="analytic", guidance=0.5)


@pytest.mark.parametrize("args,fragment", [
    (["--class", "12"], "no class '12'"),
    (["--guidance", "-1"], "--guidance must be a number >= 0"),
])
def test_bad_class_flags_are_one_line(cond_run, tmp_path, capsys, args, fragment):
    rc = main(["sample", str(cond_run), "--steps", "2", "--quiet", "--out", str(tmp_path / "x")] + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and fragment in err[0]


def test_old_unconditional_runs_load_sample_and_refuse_a_class(tmp_path, capsys):
    old = Path(__file__).parent / "data" / "run_v0_1"
    run = Run.open(old)
    assert not run.class_cond and run.class_names is None and run.null_class is None
    model = run.load_model()
    assert model.class_embed is None
    rc = main(["sample", str(old), "--class", "7", "--steps", "2", "--quiet", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "unconditional" in err[0]
    rc = main(["sample", str(old), "--guidance", "2", "--steps", "2", "--quiet", "--out", str(tmp_path / "o")])
    assert rc != 0 and "unconditional" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["sample", str(old), "--steps", "2", "--n", "2", "--quiet", "--out", str(tmp_path / "ok")]) == 0


def test_report_lists_the_classes(cond_run):
    from ddpmkit.viz.report import write_report

    page = write_report(cond_run).read_text()
    assert "<h2>Classes</h2>" in page and page.count("<tr><td>9</td><td>9</td></tr>") == 1


from test_fid import standin  # noqa: E402,F401  (the stand-in Inception network, a fixture)


def test_eval_fid_takes_class_and_guidance(cond_run, standin, tmp_path, capsys, monkeypatch):  # noqa: F811
    from ddpmkit.metrics import inception

    monkeypatch.setattr(inception, "INCEPTION_DIM", 16)  # the stand-in's width, as test_fid's fixture sets it
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    argv = ["eval", "fid", str(cond_run), "--n", "4", "--batch-size", "2", "--inception", str(standin),
            "--reference", "digits", "--steps", "2"]
    assert main(argv + ["--class", "3", "--guidance", "2"]) == 0
    out = capsys.readouterr().out
    # the reference narrowed to the real 3s (183 of the 1,797 digits)
    assert "guidance w = 2, class 3" in out and "against 183 images of digits, class 3" in out
    assert main(argv) == 0  # every class in turn, the default weight, against all the digits
    assert "against 1797 images of digits;" in capsys.readouterr().out
