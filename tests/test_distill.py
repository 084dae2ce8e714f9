"""Progressive distillation trained (ddpmkit.diffusion.distill's loss, DistillTask, `ddpmkit distill`).

The closed-form tests train a student on Gaussian data x0 ~ N(mu, s^2) (each dimension independent), whose exact
denoiser E[x0 | z_t] = mu + alpha s^2 (z_t - alpha mu) / (alpha^2 s^2 + sigma^2) is the teacher. The teacher is
affine in z_t at every t, so two of its DDIM steps are affine in z_t, and so is the x-target: the optimal student is
affine at each of its timesteps, x0_hat = a_i z + b_i, and a student of exactly that form can reach the optimum.
The end-to-end tests distil a tiny class-conditional digits teacher through the command line.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import ddim_trajectory, gaussian_x0, one_error_line, tiny_run

from ddpmkit.cli import main
from ddpmkit.diffusion import NoiseSchedule
from ddpmkit.diffusion.denoiser import DEFAULT_GUIDANCE
from ddpmkit.diffusion import distill as distill_math
from ddpmkit.diffusion.distill import (alpha_sigma, ddim_step, progressive_loss, progressive_target,
                                       progressive_triples, student_grid)
from ddpmkit.run import Run
from ddpmkit.store.checkpoint import load_checkpoint
from ddpmkit.store.rundir import read_config
from ddpmkit.train.config import TrainConfig
from ddpmkit.train.distill_config import DistillConfig
from ddpmkit.train.loop import TrainingLoop
from ddpmkit.train.tasks.distill import DistillTask

T = 1000
MU, S_DATA = 0.3, 0.2
SHAPE = (1, 2, 2)

# How close the trained student's N-step DDIM trajectory comes to the teacher's 2N-step one, at every student
# timestep and at the clean end (max abs over 256 x 4 values). Measured over seeds 0..5 at N = 2 and N = 4: at most
# 1.2e-7 (the loss is computed in float32, which bounds how far Adam can go); the tolerance leaves ~100x of margin.
TRAJ_TOL = 1e-5
# How close the learned (a_i, b_i) come to the exact optimum: measured at most 6e-8 (same runs); ~20x of margin.
COEF_TOL = 1e-6


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(T)


class AffineStudent(torch.nn.Module):
    """x0_hat = a_i z + b_i at the student's timestep tau_i (it is asked only on its own grid)."""

    def __init__(self, N: int):
        super().__init__()
        self.tau = torch.from_numpy(student_grid(T, N))
        self.a = torch.nn.Parameter(torch.zeros(N, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(N, dtype=torch.float64))

    def forward(self, z, t):
        i = torch.searchsorted(self.tau, t)
        assert torch.equal(self.tau[i], t), "the student is asked only on its grid"
        return self.a[i].view(-1, 1, 1, 1) * z + self.b[i].view(-1, 1, 1, 1)


def train_student(sched, N: int, steps: int = 300, batch: int = 64, lr: float = 0.05, seed: int = 0):
    """An AffineStudent of N steps trained with progressive_loss on fresh Gaussian batches (Adam, the learning rate
    decaying linearly to 0, as a round of DistillTask does)."""
    g = torch.Generator().manual_seed(seed)
    student = AffineStudent(N)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    teacher = gaussian_x0(sched, MU, S_DATA)
    for _ in range(steps):
        x0 = MU + S_DATA * torch.randn(batch, *SHAPE, generator=g, dtype=torch.float64)
        noise = torch.randn(batch, *SHAPE, generator=g, dtype=torch.float64)
        i = torch.randint(0, N, (batch,), generator=g)
        losses, t = progressive_loss(student, teacher, x0, noise, i, N, sched)
        assert losses.shape == (batch,) and torch.equal(t, student.tau[i])
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
        decay.step()
    return student


def optimal_affine(sched, N: int):
    """The exact optimum (a_i, b_i) of each student step: the x-target is affine in z, so two evaluations of
    progressive_target (at z = 0 and z = 1) give its slope and intercept."""
    t, tm, tn = (torch.from_numpy(v) for v in progressive_triples(T, N))
    zero = torch.zeros(N, *SHAPE, dtype=torch.float64)
    b = progressive_target(gaussian_x0(sched, MU, S_DATA), zero, t, tm, tn, sched)
    a = progressive_target(gaussian_x0(sched, MU, S_DATA), zero + 1, t, tm, tn, sched) - b
    assert torch.allclose(a, a[:, :1, :1, :1].expand_as(a), rtol=0, atol=1e-14)  # the same in every dimension
    return a[:, 0, 0, 0], b[:, 0, 0, 0]


def trajectory_error(sched, student, N: int) -> float:
    """The largest distance between the student's N-step DDIM trajectory and the teacher's 2N-step one, at every
    student timestep and at the end, from 256 draws of z_T."""
    z_T = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    mine = ddim_trajectory(student, z_T, student_grid(T, N), sched)
    theirs = ddim_trajectory(gaussian_x0(sched, MU, S_DATA), z_T, student_grid(T, 2 * N), sched)
    assert len(theirs) == 2 * len(mine) - 1
    return max((z - theirs[2 * k]).abs().max().item() for k, z in enumerate(mine))


def one_teacher_step_target(teacher_x0, z_t, t, t_mid, t_next, schedule):
    """The broken x-target: one teacher DDIM step t -> t_next (t_mid ignored) instead of two."""
    (a_t, s_t), (a_n, s_n) = alpha_sigma(schedule, t), alpha_sigma(schedule, t_next)
    with torch.no_grad():
        z_next = ddim_step(teacher_x0(z_t, t), z_t, a_t, s_t, a_n, s_n)
        ratio = (s_n / s_t).view(-1, 1, 1, 1)
        return (z_next - ratio * z_t) / (a_n - s_n / s_t * a_t).view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------ closed form, trained
@pytest.mark.parametrize("N", [2, 4])
def test_trained_student_follows_the_teachers_two_steps(sched, N):
    """A student trained with progressive_loss takes the teacher's 2N-step DDIM path in N steps (to TRAJ_TOL), and
    its coefficients are the exact optimum (to COEF_TOL), from a start at a = b = 0."""
    student = train_student(sched, N)
    a, b = optimal_affine(sched, N)
    assert (student.a.detach() - a).abs().max().item() < COEF_TOL, (student.a, a)
    assert (student.b.detach() - b).abs().max().item() < COEF_TOL, (student.b, b)
    err = trajectory_error(sched, student, N)
    assert err < TRAJ_TOL, err
    # and the check is not vacuous: the untrained student (x0_hat = 0) is far off
    assert trajectory_error(sched, AffineStudent(N), N) > 0.1


@pytest.mark.parametrize("N", [2, 4])
def test_a_one_teacher_step_target_fails_the_check(sched, N, monkeypatch):
    """The same training with the x-target of ONE teacher step (what progressive_loss would compute with t_mid =
    t_next) learns the teacher's N-step path, not its 2N-step one: it misses by far more than TRAJ_TOL (measured
    0.093 at N = 2, 0.13 at N = 4, against TRAJ_TOL = 1e-5)."""
    monkeypatch.setattr(distill_math, "progressive_target", one_teacher_step_target)
    student = train_student(sched, N)
    monkeypatch.undo()
    err = trajectory_error(sched, student, N)
    assert err > 1000 * TRAJ_TOL, err
    a, _ = optimal_affine(sched, N)
    assert (student.a.detach() - a).abs().max().item() > 1e4 * COEF_TOL


# ------------------------------------------------------------------------------------------ a tiny teacher
FLAGS = ["--steps", "1", "--teacher-steps", "4", "--round-steps", "3", "--batch-size", "16"]


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    """The teacher distilled from 4 steps to 1: two rounds of 3 optimizer steps."""
    out = tmp_path_factory.mktemp("student") / "D"
    assert main(["distill", str(teacher), "--out", str(out), *FLAGS, "--log-every", "1", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    """An unconditional diffusion run and an autoencoder run, of one step each."""
    root = tmp_path_factory.mktemp("others")
    unconditional = tiny_run(root, "unconditional", steps=1, batch_size=16)
    ae = root / "ae"
    assert main(["autoencoder", "train", "--image-size", "16", "--factor", "4", "--base-channels", "8",
                 "--num-groups", "4", "--latent-channels", "2", "--batch-size", "8", "--num-samples", "0",
                 "--steps", "1", "--quiet", "--out", str(ae)]) == 0
    return {"unconditional": unconditional, "ae": ae}


def test_distil_end_to_end(student, capsys):
    cfg = json.loads((student / "config.json").read_text())
    d = cfg["distill"]
    assert d["reached_steps"] == 1 and d["steps"] == 1 and d["teacher_steps"] == 4
    assert d["guidance"] == DEFAULT_GUIDANCE  # a class-conditional teacher with a null class: sampling's default
    assert d["sampler"] == "ddim" and d["spacing"] == "trailing" and d["method"] == "progressive"
    run = Run.open(student)
    assert run.sampling_defaults() == {"sampler": "ddim", "steps": 1, "spacing": "trailing"}
    assert run.distilled_guidance == DEFAULT_GUIDANCE
    assert load_checkpoint(student).step == 6
    # the learning rate decays to 0 over each round (3 steps: 1, 2/3, 1/3 of --lr 5e-4), and round 2 (1 step:
    # t = 39 alone, bucket 9 of T = 40) trains at one timestep; round 1 (2 steps: t = 19, 39)
    with open(student / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    lr = [float(r["lr"]) for r in rows]
    assert lr == pytest.approx([5e-4, 5e-4 * 2 / 3, 5e-4 / 3] * 2, rel=1e-4)
    assert all(r["loss_t4"] == "" and r["loss_t9"] != "" for r in rows[3:])
    assert all(r["loss_t4"] != "" for r in rows[:3])

    capsys.readouterr()
    assert main(["sample", str(student), "--n", "2", "--quiet"]) == 0
    folders = sorted(p.name for p in (student / "samples").iterdir())
    assert len(folders) == 1 and folders[0].startswith("ddim-1-trailing"), folders
    assert len(list((student / "samples" / folders[0]).glob("*.png"))) >= 2
    capsys.readouterr()
    assert main(["sample", str(student), "--n", "2", "--guidance", "2", "--quiet"]) == 2
    one_error_line(capsys, "--guidance", f"{DEFAULT_GUIDANCE:g}")
    assert main(["sample", str(student), "--n", "2", "--guidance", f"{DEFAULT_GUIDANCE:g}", "--quiet"]) == 0


# ------------------------------------------------------------------------------------------ resume
def distill_cfg(teacher) -> DistillConfig:
    return DistillConfig.from_teacher(TrainConfig.from_json(Run.open(teacher).config), str(teacher),
                                      student_steps=1, teacher_steps=4, round_steps=3, batch_size=16,
                                      guidance=DEFAULT_GUIDANCE, checkpoint_every=3)


def test_resume_across_a_round_boundary_is_bit_exact(teacher, tmp_path):
    """6 steps straight into A; B in three sessions: steps 0-2 (round 1; the checkpoint holds the original
    teacher, which the resumed step 2 uses), 2-4 (round 2 begins at step 3, after the resume: the student becomes
    the teacher) and 4-6 through `ddpmkit distill --resume` (round 2's teacher comes from the training state). The
    student (dropout on) and the teacher in the training state end identical."""
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["distill", str(teacher), "--out", str(a), *FLAGS, "--checkpoint-every", "3", "--quiet"]) == 0
    at_3 = load_checkpoint(a / "checkpoints" / "step_000000003")  # the end of round 1
    assert at_3.step == 3 and at_3.train_state["distill"]["round"] == 0

    loop = TrainingLoop(DistillTask, distill_cfg(teacher), b, quiet=True)
    assert loop.cfg.steps == 6
    loop.cfg.steps = 2  # stop early (steps is derived from the rounds, not a flag): run() checkpoints at its end
    assert loop.run()["step"] == 2

    loop = TrainingLoop(DistillTask, distill_cfg(teacher), b, quiet=True, resume=True, stored_config=read_config(b))
    assert loop.step == 2 and loop.task.round == 0
    loop.cfg.steps = 4
    assert loop.run()["step"] == 4 and loop.task.round == 1

    assert main(["distill", "--out", str(b), "--resume", "--quiet"]) == 0
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step == 6
    assert set(ca.model_state) == set(cb.model_state)
    for k in ca.model_state:
        assert torch.equal(ca.model_state[k], cb.model_state[k]), k
        assert torch.equal(ca.ema_state[k], cb.ema_state[k]), k
    ta, tb = ca.train_state["distill"], cb.train_state["distill"]
    assert (ta["round"], ta["round_start"]) == (tb["round"], tb["round_start"]) == (1, 3)
    assert set(ta["teacher"]) == set(ca.model_state)
    original = Run.open(teacher).load_model(ema=True).state_dict()
    for k in ta["teacher"]:
        assert torch.equal(ta["teacher"][k], tb["teacher"][k]), k
        # round 2's teacher is the student as it stood at the end of round 1
        assert torch.equal(ta["teacher"][k], at_3.model_state[k]), k
    assert any(not torch.equal(original[k], ta["teacher"][k]) for k in original)
    assert read_config(b)["distill"]["reached_steps"] == 1


# ------------------------------------------------------------------------------------------ errors
ERRORS = [
    ("teacher", ["--steps", "3", "--teacher-steps", "64"], ["--teacher-steps 64", "--steps 3", "power of 2"]),
    ("teacher", ["--steps", "1", "--teacher-steps", "64"], ["T = 40"]),
    ("teacher", ["--steps", "1", "--teacher-steps", "4", "--objective", "eps"], ["--objective", "eps"]),
    ("teacher", ["--steps", "1", "--teacher-steps", "4", "--round-steps", "0"], ["--round-steps"]),
    ("teacher", ["--steps", "1", "--teacher-steps", "4", "--guidance", "-1"], ["--guidance"]),
    ("ae", ["--steps", "1", "--teacher-steps", "4"], ["not a diffusion run"]),
    ("missing", ["--steps", "1", "--teacher-steps", "4"], ["does not exist"]),
    ("student", ["--steps", "1", "--teacher-steps", "2"], ["distilled student"]),
    ("unconditional", ["--steps", "1", "--teacher-steps", "4", "--guidance", "1"], ["--guidance", "unconditional"]),
]


@pytest.mark.parametrize("which,flags,words", ERRORS, ids=[f"{w}:{' '.join(f)}" for w, f, _ in ERRORS])
def test_bad_requests_are_one_line_and_write_nothing(which, flags, words, teacher, student, other_runs, tmp_path,
                                                      capsys):
    runs = {"teacher": teacher, "student": student, "missing": tmp_path / "nope", **other_runs}
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["distill", str(runs[which]), "--out", str(out), *flags, "--quiet"]) == 2
    one_error_line(capsys, *words)
    assert not out.exists()


def test_a_non_empty_out_is_refused(teacher, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["distill", str(teacher), "--out", str(out), *FLAGS, "--quiet"]) == 2
    one_error_line(capsys, "not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_resuming_a_run_that_is_not_a_distillation_is_refused(teacher, capsys):
    before = sorted(p.name for p in teacher.rglob("*"))
    capsys.readouterr()
    assert main(["distill", "--out", str(teacher), "--resume", "--quiet"]) == 2
    one_error_line(capsys, "not a distillation run", "ddpmkit train")
    assert sorted(p.name for p in teacher.rglob("*")) == before


# ------------------------------------------------------------------------------------------ export
def test_export_draws_the_student_in_diffusers(student, tmp_path, capsys):
    """export-diffusers writes a progressive student's DDIMScheduler on its trailing timesteps: diffusers' pipeline
    at the student's steps, unguided (its network is guided already), draws what `ddpmkit sample` draws."""
    diffusers = pytest.importorskip("diffusers")
    from ddpmkit.samplers import sample

    out = tmp_path / "export"
    assert main(["export-diffusers", str(student), "--out", str(out)]) == 0
    logged = capsys.readouterr().out
    assert "num_inference_steps=1" in logged and "guidance=0" in logged, logged
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["timestep_spacing"] == "trailing"
    assert sched["prediction_type"] == "v_prediction"
    run = Run.open(student)
    labels = torch.tensor([3, 7])
    x_T = torch.randn(2, *run.image_shape, generator=torch.Generator().manual_seed(0))
    ours = sample(run.denoiser().with_cond(labels), x_T.clone(), sampler="ddim", steps=1, spacing="trailing")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(class_labels=labels.tolist(), guidance=0.0, num_inference_steps=1, latents=x_T.clone(),
                  output_type="pt").images
    assert (ours.clamp(-1, 1) * 0.5 + 0.5 - theirs).abs().max().item() < 1e-5


def test_the_report_says_where_a_student_came_from(student, teacher):
    from ddpmkit.viz.summary import summarize

    facts = {f.label: f.value for f in summarize(student, read_config(student)).model}
    assert facts["distilled from"] == str(teacher)
    assert facts["draws with"] == (f"ddim, 1 step, trailing timesteps, guided at w = {DEFAULT_GUIDANCE:g} in one "
                                   "call per step")
    assert "distilled from" not in {f.label for f in summarize(teacher, read_config(teacher)).model}
