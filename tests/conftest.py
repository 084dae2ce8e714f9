"""Tiny training configurations shared by the tests: import the helpers with ``from conftest import ...``.

TINY_NET is the smallest run that exercises every part of the U-Net and the loop (two levels, 8x8 images,
T = 40); :func:`tiny_cfg` is it as a TrainConfig, :func:`tiny_flags` as ``ddpmkit train`` flags, and
:func:`tiny_run` trains one quietly into a folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ddpmkit.train import Trainer, config_from_preset
from ddpmkit.train.config import flag, show_value

TINY_NET = dict(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4, T=40,
                batch_size=8, sample_steps=5, lr_decay="none")  # no decay: the digits preset's cosine decay
# depends on --steps, which the resume tests change

# what tiny_cfg adds: dropout on (so that an exact resume must restore the random state), a warm-up longer
# than the run (the learning rate changes at every step), checkpoints every 2 steps, no sample grids
TINY_RUN = dict(steps=6, dropout=0.1, lr=1e-3, warmup=100, log_every=2, checkpoint_every=2, sample_every=100,
                num_samples=0)


def tiny_cfg(**overrides):
    """The tiny configuration (digits preset, TINY_NET and TINY_RUN), with any field overridden."""
    return config_from_preset("digits", **{**TINY_NET, **TINY_RUN, **overrides})


def tiny_flags(**overrides) -> list[str]:
    """``ddpmkit train`` flags for TINY_NET (plus any setting given here, e.g. ``log_every=2``) and --quiet."""
    out = []
    for name, value in {**TINY_NET, **overrides}.items():
        if isinstance(value, bool):
            out.append(flag(name) if value else flag(name).replace("--", "--no-", 1))
        else:
            out += [flag(name), show_value(value)]
    return out + ["--quiet"]


def tiny_run(root, name: str = "run", **overrides) -> Path:
    """Train tiny_cfg(**overrides) quietly in root/name; returns the run directory."""
    run = Path(root) / name
    Trainer(tiny_cfg(**overrides), run, quiet=True).run()
    return run


def randomized(model_class, cfg: dict, seed: int = 0):
    """A diffusers model of ``model_class`` built from ``cfg`` with every parameter random, GroupNorm scales and
    biases included (diffusers initialises those to 1 and 0, which would hide a swapped or missing one)."""
    import torch

    torch.manual_seed(seed)
    m = model_class(**cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return m.eval()


def gaussian_x0(sched, mu: float, s: float):
    """The exact denoiser E[x0 | z_t] of N(mu, s^2 I) data under ``sched`` (float64), at integer or real-valued t:
    mu + alpha s^2 (z_t - alpha mu) / (alpha^2 s^2 + sigma^2) with alpha^2 = alpha_bar_t, sigma^2 = 1 - alpha_bar_t."""
    from ddpmkit.diffusion.distill import alpha_sigma

    def x0(z, t):
        a, sig = (v.view(-1, *([1] * (z.ndim - 1))) for v in alpha_sigma(sched, t))
        return mu + a * s * s * (z - a * mu) / (a * a * s * s + sig * sig)

    return x0


def ddim_trajectory(x0_fn, z, grid, sched):
    """z at every timestep of ``grid`` (increasing; walked noisiest first, from z itself) and at the clean end, by
    deterministic DDIM steps with ``x0_fn(z, t)``'s estimates, without gradients."""
    import torch

    from ddpmkit.diffusion.distill import END, alpha_sigma, ddim_step

    seq = [int(v) for v in grid[::-1]] + [END]
    out = [z]
    with torch.no_grad():
        for t, s in zip(seq[:-1], seq[1:]):
            tt = torch.full((z.shape[0],), t)
            (a_t, s_t), (a_s, s_s) = alpha_sigma(sched, tt), alpha_sigma(sched, torch.full_like(tt, s))
            z = ddim_step(x0_fn(z, tt), z, a_t, s_t, a_s, s_s)
            out.append(z)
    return out


def gaussian_eps(sched, mu: float, s: float):
    """The exact noise predictor of N(mu, s^2 I) data under ``sched`` (float64): E[eps | x_t] in closed form."""
    def net(x, t):
        a = sched.alpha_bar_at(t).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * s * s + 1 - a)

    return net


def quiet_main(args) -> str:
    """``ddpmkit ARGS`` in this process, which must succeed; what it printed."""
    import contextlib
    import io

    from ddpmkit.cli import main

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(args) == 0
    return printed.getvalue()


def perturb_run(run: Path, seed: int) -> None:
    """New weights for a run (model and EMA): its own plus noise of sd 0.05, so that labels and guidance matter in a
    run trained for only a few steps; saved as its checkpoint of step 100."""
    import torch

    from ddpmkit.run import Run
    from ddpmkit.store.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in Run.open(run).load_model().state_dict().items()}
    save_checkpoint(run, 100, model_state=state, ema_state=state, keep=None)


def one_error_line(capsys, *words) -> str:
    """The command's stderr: one line, ``ddpmkit: error: ...``, holding each of ``words``."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpmkit: error: ") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny class-conditional digits run (TINY_NET, T = 40, a null class) of 4 steps: a teacher to distil."""
    return tiny_run(tmp_path_factory.mktemp("teacher"), class_cond=True, steps=4, batch_size=16)
