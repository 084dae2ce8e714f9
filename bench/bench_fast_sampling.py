"""Quality against network calls: every sampler on the demo's digits model, beside diffusers' matching schedulers.

    python bench/bench_fast_sampling.py                         # trains the demo's model once, then measures
    python bench/bench_fast_sampling.py --run runs/demo --n 500  # an existing digits run

For each sampler at 5, 10, 20 and 50 network calls (Heun takes 2 S - 1 calls for S timesteps, so it gets the S whose
calls come nearest below) it draws ``--n`` samples from the same initial noise (sample i from stream (seed, i)) and
scores them with the project's digits classifier: the Frechet distance of its features to those of the real digits.
DDIM at 1000 steps is the converged ODE. The same model, exported with ``export-diffusers``, is then stepped by
diffusers' matching schedulers (their default timesteps, from the same x_T) in the same run. Ours run as
``ddpmkit sample`` runs them: with the sampler's default timesteps, x0 clipped to [-1, 1].

The last lines say, per sampler, at how many calls it first comes within 5% of the converged figure, and the two
targets of issue 16: the best deterministic sampler at 10 calls against the converged figure, and at 5 calls
against DDIM.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ddpmkit.images import to_uint8  # noqa: E402
from ddpmkit.metrics.digits import DigitsClassifier  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.samplers import SAMPLERS, PerSampleNoise, sample  # noqa: E402
from digits_tools import reference_rows  # noqa: E402

CALLS = (5, 10, 20, 50)
OURS = ("ddim", "ipndm", "dpmpp-2m", "dpmpp-3m", "unipc", "heun", "dpmpp-2m-sde")
STOCHASTIC = ("dpmpp-2m-sde",)


def steps_for_calls(name: str, calls: int) -> int:
    """The most timesteps whose network calls do not exceed ``calls``."""
    info = SAMPLERS[name]
    return max(s for s in range(1, calls + 1) if info.model_calls(s) <= calls)


def train_demo_model(out: Path, steps: int) -> Path:
    """The demo's recipe (the digits preset) for a fixed number of steps: a busy machine trains the same model."""
    from ddpmkit.train import Trainer, config_from_preset

    cfg = config_from_preset("digits", steps=steps, sample_every=1_000_000, num_samples=0)
    res = Trainer(cfg, out, quiet=True).run()
    print(f"trained the demo's digits model: {res['step']} steps in {res['seconds']:.0f} s -> {out}", flush=True)
    return out


def diffusers_runner(run: Run, export_dir: Path):
    """A function (name, steps, x_T, seed) -> x_0 stepping diffusers' scheduler for our sampler ``name``, or None."""
    import diffusers

    from ddpmkit.interop import export_diffusers

    if not (export_dir / "unet").is_dir():
        export_diffusers(run.dir, export_dir, log=lambda *a: None)
    unet = diffusers.UNet2DModel.from_pretrained(export_dir / "unet").eval()
    config = diffusers.DDPMScheduler.from_pretrained(export_dir / "scheduler").config
    made = {
        "ddim": lambda: diffusers.DDIMScheduler.from_config(config),
        "dpmpp-2m": lambda: diffusers.DPMSolverMultistepScheduler.from_config(config, solver_order=2),
        "dpmpp-3m": lambda: diffusers.DPMSolverMultistepScheduler.from_config(config, solver_order=3),
        "dpmpp-2m-sde": lambda: diffusers.DPMSolverMultistepScheduler.from_config(
            config, solver_order=2, algorithm_type="sde-dpmsolver++"),
        "unipc": lambda: diffusers.UniPCMultistepScheduler.from_config(config),
        "heun": lambda: diffusers.HeunDiscreteScheduler.from_config(config),
    }

    @torch.inference_mode()
    def step_through(name, steps, x_T, seed, batch=250):
        if name not in made:
            return None
        outs = []
        for lo in range(0, x_T.shape[0], batch):
            sch = made[name]()
            sch.set_timesteps(steps)
            g = torch.Generator().manual_seed(seed + lo)
            x = x_T[lo:lo + batch] * sch.init_noise_sigma
            for t in sch.timesteps:
                out = unet(sch.scale_model_input(x, t), t).sample
                kw = {"generator": g} if name in STOCHASTIC else {}
                x = sch.step(out, t, x, **kw).prev_sample
            outs.append(x)
        return torch.cat(outs)

    return step_through


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="a digits run (default: train the demo's model into --workdir)")
    p.add_argument("--workdir", default="runs/bench-fast-sampling", help="where the trained model and export go")
    p.add_argument("--train-steps", type=int, default=1200,
                   help="training steps of the demo's model (its 150 s on 2 cores make about 1,200)")
    p.add_argument("--n", type=int, default=500, help="samples per figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' schedulers")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    run_dir = Path(a.run) if a.run else work / "run"
    if not (run_dir / "config.json").is_file():
        train_demo_model(run_dir, a.train_steps)
    run = Run.open(run_dir)
    den = run.denoiser()
    clf = DigitsClassifier.load_or_train(log=lambda *m: None)
    x_T = PerSampleNoise(a.seed).initial((a.n, *run.image_shape))
    real = reference_rows(clf)[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {run.dir}; n = {a.n}; the {real.n} held-out "
          f"real digits score FD {real.fd:.2f}", flush=True)

    def score(x) -> float:
        return clf.fd(to_uint8(x.float().cpu()))

    t0 = time.perf_counter()
    converged = score(sample(den, x_T, sampler="ddim", steps=min(1000, den.T), noise=PerSampleNoise(a.seed)))
    print(f"DDIM, 1000 steps (the converged ODE): FD {converged:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    theirs = None if a.no_diffusers else diffusers_runner(run, work / "diffusers")
    table = {}
    for name in OURS:
        for calls in CALLS:
            S = steps_for_calls(name, calls)
            t0 = time.perf_counter()
            ours = score(sample(den, x_T, sampler=name, steps=S, noise=PerSampleNoise(a.seed)))
            d = theirs(name, S, x_T, a.seed) if theirs is not None else None
            dfd = score(d) if d is not None else None
            table[name, calls] = (ours, dfd, SAMPLERS[name].model_calls(S))
            print(f"  {name:<13} {SAMPLERS[name].model_calls(S):>3} calls: ours {ours:7.2f}   diffusers "
                  f"{'-' if dfd is None else f'{dfd:7.2f}'}   ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\nFrechet distance of {a.n} samples (digits classifier features; lower is better); converged ODE "
          f"{converged:.2f}")
    print("| sampler | " + " | ".join(f"{c} calls (ours / diffusers)" for c in CALLS) + " |")
    print("| --- |" + " --- |" * len(CALLS))
    for name in OURS:
        cells = []
        for c in CALLS:
            ours, dfd, used = table[name, c]
            cell = f"{ours:.2f} / {'-' if dfd is None else f'{dfd:.2f}'}"
            cells.append(cell + (f" ({used})" if used != c else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name in OURS:
        first = next((table[name, c][2] for c in CALLS if table[name, c][0] <= 1.05 * converged), None)
        print(f"{name}: within 5% of the converged figure at "
              f"{'more than ' + str(CALLS[-1]) if first is None else first} calls")
    det = [n for n in OURS if n not in STOCHASTIC]
    best10 = min(det, key=lambda n: table[n, 10][0])
    best5 = min(det, key=lambda n: table[n, 5][0])
    print(f"at 10 calls the best deterministic sampler, {best10}, is at {table[best10, 10][0] / converged:.3f} x "
          f"the converged figure (target <= 1.05)")
    print(f"at 5 calls the best deterministic sampler, {best5}, is at {table[best5, 5][0] / table['ddim', 5][0]:.3f} "
          f"x DDIM's figure (target <= 0.75)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
