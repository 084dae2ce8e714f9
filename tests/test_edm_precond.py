"""EDM's preconditioning (Karras et al. 2022, table 1) as a parameterisation of the network: ``--precond edm``.

The truths checked here are written from the paper, not from the code: table 1's coefficients by hand, their
reduction to v-prediction at sigma_data = 1, the ideal denoiser of Gaussian data (whose preconditioned network makes
the Denoiser's x0 the exact posterior mean, at integer and real t), eq. 8's intent (lambda makes the ideal
denoiser's loss 1 at every sigma when the data's sd is sigma_data), the log-normal noise levels, an exact resume,
and the commands.
"""

import json
import math

import numpy as np
import pytest
import torch
from conftest import gaussian_eps, tiny_cfg, tiny_flags

from ddpmkit.cli import main
from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.diffusion.losses import edm_training_losses, sample_edm_timesteps
from ddpmkit.diffusion.precond import edm_loss_weight, edm_scalings, preconditioned, sigma_of_alpha_bar
from ddpmkit.run import Run
from ddpmkit.store.checkpoint import load_checkpoint
from ddpmkit.train import Trainer

MU, S = 0.3, 0.5  # Gaussian data N(MU, S^2); S = EDM's sigma_data


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(1000)


def t_of_sigma(sched, sigma) -> torch.Tensor:
    """The real-valued timesteps of EDM noise levels ``sigma``: alpha_bar = 1 / (1 + sigma^2)."""
    log_ab = -np.log1p(np.asarray(sigma, dtype=np.float64) ** 2)
    return torch.from_numpy(sched.timestep_of_log_alpha_bar(log_ab))


def ideal_D(x, sigma, mu=MU, s=S):
    """E[y | y + sigma n = x] for y ~ N(mu, s^2): mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    return mu + s * s / (s * s + sigma * sigma) * (x - mu)


def ideal_F(sigma_data, mu=MU, s=S):
    """The backbone whose preconditioned D is ``ideal_D``: F* = (D* - c_skip x) / c_out, from its inputs alone
    (sigma = exp(4 c_noise), x = (c_in x) / c_in)."""
    def net(u, c_noise):
        sigma = torch.exp(4.0 * c_noise.double()).view(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm_scalings(sigma, sigma_data)
        x = u.double() / c_in
        return ((ideal_D(x, sigma, mu, s) - c_skip * x) / c_out).to(u.dtype)
    return net


# --------------------------------------------------------------------------------------------- the coefficients
def test_coefficients_are_table_1_by_hand():
    # sigma = sigma_data = 0.5: sigma^2 + sd^2 = 0.5
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor([0.5, 2.0], dtype=torch.float64), 0.5)
    assert c_skip.tolist() == pytest.approx([0.5, 0.25 / 4.25], rel=1e-15)
    assert c_out.tolist() == pytest.approx([0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)], rel=1e-15)
    assert c_in.tolist() == pytest.approx([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)], rel=1e-15)
    assert c_noise.tolist() == pytest.approx([math.log(0.5) / 4, math.log(2.0) / 4], rel=1e-15)
    lam = edm_loss_weight(torch.tensor([0.5, 2.0], dtype=torch.float64), 0.5)
    assert lam.tolist() == pytest.approx([0.5 / 0.0625, 4.25 / 1.0], rel=1e-15)
    assert (lam * c_out ** 2).tolist() == pytest.approx([1.0, 1.0], rel=1e-14)  # F's effective weight (eq. 8)
    assert c_skip.dtype == c_out.dtype == c_in.dtype == c_noise.dtype == torch.float64
    sigma = sigma_of_alpha_bar(torch.tensor(0.2, dtype=torch.float64)).item()
    assert sigma == pytest.approx(2.0, rel=1e-15)  # sqrt(0.8 / 0.2)


def test_sigma_data_one_is_v_prediction(sched):
    # with sd = 1: sigma^2 + 1 = 1 / ab, so c_skip = ab, c_out = sqrt(1 - ab), c_in x = x_t, and
    # D = sqrt(ab) x_t + sqrt(1 - ab) F: v-prediction x0 = sqrt(ab) x_t - sqrt(1 - ab) v with v = -F
    t = torch.tensor([0, 17, 400, 999])
    ab = sched.alpha_bar_at(t)
    c_skip, c_out, c_in, _ = edm_scalings(sigma_of_alpha_bar(ab), 1.0)
    assert torch.allclose(c_skip, ab, rtol=1e-12) and torch.allclose(c_out, (1 - ab).sqrt(), rtol=1e-12)
    seen = {}

    def backbone(u, c_noise):
        seen["u"] = u
        return torch.tanh(u) * 0.7 + 0.1

    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    x0_edm = Denoiser(backbone, sched, "x0", clip_x0=False, precond=1.0)(x_t, t).x0
    assert torch.allclose(seen["u"], x_t, rtol=1e-12, atol=1e-12)  # c_in x = x_t
    v_den = Denoiser(lambda x, tt: -backbone(x, tt), sched, "v", clip_x0=False)
    # integer t: the v reading takes the schedule's float32 sqrt(alpha_bar) arrays; real t: float64 alpha_bar_at
    assert torch.allclose(x0_edm, v_den(x_t, t).x0, rtol=1e-6, atol=1e-6)
    t_real = torch.tensor([0.0, 17.0, 400.5, 998.25], dtype=torch.float64)
    x0_edm = Denoiser(backbone, sched, "x0", clip_x0=False, precond=1.0)(x_t, t_real).x0
    assert torch.allclose(x0_edm, v_den(x_t, t_real).x0, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------- the ideal denoiser
@pytest.mark.parametrize("real", [False, True], ids=["integer-t", "real-t"])
def test_the_ideal_network_makes_x0_the_posterior_mean(sched, real):
    t = torch.tensor([0.0, 3.5, 250.25, 998.75], dtype=torch.float64) if real else torch.tensor([0, 3, 250, 999])
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    den = Denoiser(ideal_F(S), sched, "x0", clip_x0=False, precond=S)
    ab = sched.alpha_bar_at(t).view(-1, 1, 1, 1)
    want = ideal_D(x_t / ab.sqrt(), sigma_of_alpha_bar(ab))  # D*(x; sigma(t)) at x = x_t / sqrt(ab)
    pred = den(x_t, t)
    assert torch.allclose(pred.x0.double(), want, rtol=1e-10, atol=1e-12)
    # the same posterior mean as the exact noise predictor read as eps (an independent route; at integer t that
    # reading takes the schedule's float32 arrays)
    plain = Denoiser(gaussian_eps(sched, MU, S), sched, "eps", clip_x0=False)(x_t, t)
    tol = 1e-9 if real else 1e-5
    assert torch.allclose(pred.x0.double(), plain.x0.double(), rtol=tol, atol=tol)
    tol = 1e-9 if real else 1e-4  # eps from x0 divides by sqrt(1 / alpha_bar - 1), 0.01 at t = 0
    assert torch.allclose(pred.eps.double(), plain.eps.double(), rtol=tol, atol=tol)


def test_a_respaced_and_a_guided_denoiser_precondition_every_call(sched):
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    den = Denoiser(ideal_F(S), sched, "x0", clip_x0=False, precond=S)
    tau = np.arange(9, 1000, 10)
    # index i of the respaced Denoiser is timestep tau_i: its alpha_bar, not the network's timestep, gives sigma
    i = torch.tensor([0, 50, 99])
    a, b = den.respaced(tau)(x_t, i).x0, den(x_t, torch.from_numpy(tau)[i]).x0
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # the respaced alpha_bar is stored in float32

    def cond_net(u, c_noise, y):  # a conditional backbone: the label shifts its output
        return torch.tanh(u) + y.view(-1, 1, 1, 1).to(u.dtype) * 0.25

    w, y, null = 1.5, torch.tensor([0, 1, 2]), 3
    base = Denoiser(cond_net, sched, "x0", clip_x0=False, precond=S)
    t = torch.tensor([5, 300, 900])
    guided = base.guided(w, null).with_cond(y)(x_t, t).x0  # one doubled batch, both halves preconditioned
    x0_c = base.with_cond(y)(x_t, t).x0
    x0_u = base.with_cond(torch.full_like(y, null))(x_t, t).x0
    assert torch.allclose(guided, (1 + w) * x0_c - w * x0_u, rtol=1e-10, atol=1e-12)  # Ho & Salimans eq. 6


def test_the_denoiser_refuses_a_preconditioned_network_read_as_another_objective(sched):
    with pytest.raises(ValueError, match="objective is x0"):
        Denoiser(ideal_F(S), sched, "eps", precond=S)
    with pytest.raises(ValueError, match="positive"):
        Denoiser(ideal_F(S), sched, "x0", precond=0.0)
    with pytest.raises(ValueError, match="image's shape"):
        preconditioned(lambda u, c: torch.cat([u, u], 1), torch.zeros(2, 1, 4, 4), 0.5, S)


# --------------------------------------------------------------------------------------------- the loss
SIGMAS = [0.05, 0.3, 1.0, 5.0, 40.0]


def test_the_weighted_loss_of_the_ideal_denoiser_is_one_at_every_sigma(sched):
    # EDM eq. 8's intent: with the data's sd = sigma_data, lambda(sigma) E||D* - x0||^2 / d = lambda s^2 sigma^2 /
    # (s^2 + sigma^2) = 1. Per pixel lambda (D* - x0)^2 is chi^2_1 (mean 1, variance 2): a sample's loss, the mean of
    # d of them, has sd sqrt(2 / d), and the batch mean sqrt(2 / (B d)).
    B, shape = 2048, (1, 8, 8)
    g = torch.Generator().manual_seed(3)
    net = ideal_F(S)
    means, wrong = [], []
    for sigma in SIGMAS:
        x0 = MU + S * torch.randn((B, *shape), generator=g, dtype=torch.float64)
        t = t_of_sigma(sched, [sigma] * B)
        losses, t_used = edm_training_losses(net, sched, x0, sigma_data=S, t=t, generator=g)
        assert torch.equal(t_used, t) and losses.shape == (B,)
        se = losses.std().item() / math.sqrt(B)
        assert se == pytest.approx(math.sqrt(2 / (B * 64)), rel=0.15)
        assert abs(losses.mean().item() - 1.0) < 4 * se, (sigma, losses.mean().item(), se)
        means.append(losses.mean().item())
        # a deliberately wrong weight, 1 / sigma^2: its expectation s^2 / (s^2 + sigma^2) falls with sigma
        sig = sigma_of_alpha_bar(sched.alpha_bar_at(t))
        w = (1.0 / sig ** 2 / edm_loss_weight(sig, S)).float()
        wrong.append((losses * w).mean().item())
        assert wrong[-1] == pytest.approx(S * S / (S * S + sigma * sigma), rel=4 * math.sqrt(2 / (B * 64)))
    assert max(wrong) - min(wrong) > 0.9  # from 0.99 at sigma = 0.05 to 1.6e-4 at sigma = 40: not constant
    print("EDM loss of the ideal denoiser at sigma", SIGMAS, ":", [f"{m:.4f}" for m in means],
          "; with 1/sigma^2:", [f"{m:.4g}" for m in wrong])


def test_the_log_normal_noise_levels(sched):
    # ln sigma ~ N(P_mean, P_std^2), each mapped to a real t of the linear schedule (sigma 0.0100 .. 157) and clamped:
    # the part inside the range is the normal truncated at ln(0.0100), whose moments are known in closed form
    n, p_mean, p_std = 200_000, -1.2, 1.2
    g = torch.Generator().manual_seed(4)
    t = sample_edm_timesteps(n, sched, p_mean, p_std, generator=g)
    assert t.dtype == torch.float64 and t.min() >= 0 and t.max() <= 999
    log_sigma = sigma_of_alpha_bar(sched.alpha_bar_at(t)).log()
    z = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # the same draw, again
    inside = t > 0
    assert torch.allclose(log_sigma[inside], (p_mean + p_std * z)[inside], atol=1e-9)  # sigma of t = sigma drawn
    a = (math.log(sigma_of_alpha_bar(sched.alpha_bar_at(torch.tensor(0))).item()) - p_mean) / p_std  # -2.84
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    below = 0.5 * math.erfc(-a / math.sqrt(2))  # Phi(a), 0.23%
    frac = 1.0 - inside.double().mean().item()
    assert abs(frac - below) < 4 * math.sqrt(below * (1 - below) / n), (frac, below)
    # the normal truncated below at a: mean mu + sd phi(a) / (1 - Phi(a)), variance sd^2 (1 + a phi / (1 - Phi) - r^2)
    r = phi / (1 - below)
    mean_in, sd_in = p_mean + p_std * r, p_std * math.sqrt(1 + a * r - r * r)
    ls = log_sigma[inside]
    se_mean, se_sd = sd_in / math.sqrt(ls.numel()), sd_in / math.sqrt(2 * ls.numel())
    assert abs(ls.mean().item() - mean_in) < 4 * se_mean, (ls.mean().item(), mean_in, se_mean)
    assert abs(ls.std().item() - sd_in) < 4 * se_sd, (ls.std().item(), sd_in, se_sd)
    print(f"ln sigma inside: mean {ls.mean().item():.4f} (truncated normal {mean_in:.4f}, SE {se_mean:.4f}), "
          f"sd {ls.std().item():.4f} ({sd_in:.4f}, SE {se_sd:.4f}); below the range {frac:.5f} ({below:.5f})")


# --------------------------------------------------------------------------------------------- a run
def test_an_edm_run_resumes_bit_for_bit_and_records_its_precond(tmp_path):
    kw = dict(precond="edm", num_samples=4, checkpoint_every=3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(tiny_cfg(steps=6, **kw), straight, quiet=True).run()
    Trainer(tiny_cfg(steps=3, **kw), split, quiet=True).run()  # N/2, then a resume for the other N/2
    Trainer(tiny_cfg(steps=6, **kw), split, resume=True, quiet=True).run()
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a.step == b.step == 6
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k
        assert torch.equal(a.ema_state[k], b.ema_state[k]), k
    Trainer(tiny_cfg(steps=1, **kw), tmp_path / "one", quiet=True).run()  # the weights move: not a vacuous check
    k0 = next(k for k in a.model_state if k.endswith("conv_in.weight"))
    assert not torch.equal(load_checkpoint(tmp_path / "one").model_state[k0], a.model_state[k0])
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["diffusion"]["precond"] == {"kind": "edm", "sigma_data": 0.5}
    assert cfg["diffusion"]["objective"] == "x0" and cfg["train"]["precond"] == "edm"
    den = Run.open(straight).denoiser()
    assert den.precond == 0.5 and den.objective == "x0"
    rows = (straight / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    buckets = [last[header.index(f"loss_t{i}")] for i in range(10)]
    assert any(v not in ("", "None") for v in buckets)  # the real-valued t fall into the buckets


def test_the_cli_trains_an_edm_run_and_samples_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "4", "--precond", "edm", "--num-samples", "0"]
                + tiny_flags()) == 0
    for sampler, steps in (("ddim", 5), ("dpmpp-2m", 5), ("heun", 4)):
        out = tmp_path / sampler
        assert main(["sample", str(run), "--sampler", sampler, "--steps", str(steps), "--n", "3", "--out",
                     str(out), "--quiet"]) == 0, sampler
        assert len(list(out.glob("sample_*.png"))) == 3, sampler


REFUSED = [(["--precond", "edm", "--objective", "eps"], "objective is x0"),
           (["--precond", "edm", "--learn-sigma"], "--learn-sigma"),
           (["--precond", "edm", "--loss-weight", "min-snr"], "--loss-weight"),
           (["--precond", "edm", "--timestep-sampler", "loss-second-moment"], "--timestep-sampler"),
           (["--precond", "edm", "--edm-sigma-data", "0"], "--edm-sigma-data"),
           (["--precond", "edm", "--p-std", "0"], "--p-std"),
           (["--precond", "edm", "--p-mean", "nan"], "--p-mean"),
           (["--precond", "nope"], "--precond"),
           (["--edm-sigma-data", "0.3"], "add --precond edm")]


@pytest.mark.parametrize("flags,words", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, flags, words):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--steps", "1", *flags] + tiny_flags()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpmkit: error: ") and "\n" not in err and words in err, err
    assert not out.exists()


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_an_edm_teacher_distils_into_an_edm_student(tmp_path, method):
    """The student keeps its teacher's preconditioning: its objective is x0, its config.json records the precond,
    and with a learning rate too small to move it, it draws what its teacher draws (read without the
    preconditioning, it would draw something else entirely)."""
    import torch

    from ddpmkit.run import Run
    from ddpmkit.samplers import sample

    run = tmp_path / "teacher"
    Trainer(tiny_cfg(steps=2, precond="edm"), run, quiet=True).run()
    out = tmp_path / "student"
    assert main(["distill", str(run), "--out", str(out), "--method", method, "--steps", "1", "--teacher-steps",
                 "2", "--round-steps", "1", "--lr", "1e-30", "--batch-size", "8", "--quiet"]) == 0
    student = Run.open(out)
    assert student.objective == "x0" and student.precond_sigma_data == 0.5
    teacher_den, student_den = Run.open(run).denoiser(clip_x0=False), student.denoiser(clip_x0=False)
    assert student_den.precond == 0.5
    x_T = torch.randn(4, *student.image_shape, generator=torch.Generator().manual_seed(0))
    if method == "progressive":
        a = sample(teacher_den, x_T.clone(), sampler="ddim", steps=1, spacing="trailing")
        b = sample(student_den, x_T.clone(), sampler="ddim", steps=1, spacing="trailing")
        assert (a - b).abs().max().item() < 1e-4
    else:  # the student's f at t = T - 1 is c_skip x + (1 - c_skip) D, D its teacher's
        t = torch.full((4,), student.schedule.T - 1)
        assert (student_den(x_T, t).x0 - teacher_den(x_T, t).x0).abs().max().item() < 1e-2
