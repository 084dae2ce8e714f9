"""A distilled student as a training task: progressive distillation (Salimans & Ho 2022, algorithm 2) and
consistency distillation (Song et al. 2023, algorithm 2).

The student is a copy of the teacher's network. Round r distils a teacher of N_r DDIM steps into a student of
N_r / 2: at a student timestep, the student's x0 estimate is pulled towards the x-target x_tilde with which one DDIM
step lands exactly where two of the teacher's land (:func:`ddpmkit.diffusion.distill.progressive_target`), in the
x-space loss with the truncated-SNR weight max(SNR, 1) (the paper's section 4). At the end of a round the student,
as it stands, becomes the teacher of the next. The timesteps are the ``trailing`` grid of N steps, which nests from
round to round (:func:`~ddpmkit.diffusion.distill.student_grid`).

Consistency distillation is one round: at a pair of adjacent noise levels (EDM's spacing, ``cd_levels`` of them) the
student's consistency function f at the noisier one is pulled towards the target network's f where one Heun step
of the teacher's probability-flow ODE lands (:func:`~ddpmkit.diffusion.distill.consistency_target`); the target is
an EMA (``target_ema``) of the student, and f meets the boundary condition by construction
(:func:`~ddpmkit.diffusion.distill.consistency_x0`). The consistency sampler draws from it in one or a few steps.

A class-conditional teacher is distilled guided, as Meng et al. 2023 do for a fixed weight: round 0's teacher is the
classifier-free-guided one at ``guidance`` w (two network calls), and the student learns that guided prediction in
one call; the null class, drawn with the run's label dropout, learns the unguided unconditional model.

Everything the loop needs for an exact resume is state: the data order and the generator (as for the diffusion
task), the round, where it began, the teacher's weights, and consistency's target network.
"""

from __future__ import annotations

import time

import torch

from ...diffusion import Denoiser
from ...diffusion.distill import alpha_sigma, consistency_target, progressive_loss
from ...errors import ConfigError
from ..task import LossOut, TaskContext
from .diffusion import DiffusionTask

__all__ = ["DistillTask"]


class DistillTask(DiffusionTask):
    """Progressive or consistency distillation (``cfg.method``) of the teacher run ``cfg.teacher`` (a
    :class:`~ddpmkit.train.distill_config.DistillConfig`)."""

    def __init__(self, cfg, ctx: TaskContext):
        super().__init__(cfg, ctx)  # the teacher's data (or latents), batcher, schedule and generator
        self.round, self.round_start = 0, 0
        self.teacher_objective = None  # round 0's teacher's; later rounds' teachers are students (cfg.objective)
        self._teacher_state = None
        self._session_t0 = None  # with --time-limit: when this session's first step began, and its rounds' shares
        self._round_t0 = None
        self._round_seconds = None
        self._target_due = False  # consistency: the target's EMA update for the step just applied is pending
        if cfg.method == "consistency":
            from ...samplers.timesteps import timesteps

            # Song et al. 2023: N + 1 levels from sigma_min (t = 0) to the largest, EDM's spacing (real-valued t)
            self.levels = torch.from_numpy(timesteps(self.schedule, cfg.cd_levels + 1, "karras",
                                                     integer=False).astype("float64")).to(ctx.device)
        if ctx.stored_config is None:  # a new run: the teacher's weights (EMA) from its run
            from ...run import Run

            run = Run.open(cfg.teacher)
            if run.kind != "diffusion":
                raise ConfigError(f"{cfg.teacher} is an autoencoder run: distil a diffusion run")
            net = run.load_model(ema=True)
            self._teacher_state = {k: v.to(ctx.device) for k, v in net.state_dict().items()}
            self.teacher_objective = run.objective

    # ------------------------------------------------------------------ the networks
    def build(self) -> dict[str, torch.nn.Module]:
        names = ["model", "teacher"] + (["target"] if self.consistency else [])
        nets = {n: super(DistillTask, self).build()["model"] for n in names}
        if self._teacher_state is not None:  # a new run: all start as the teacher (a resume loads them)
            for net in nets.values():
                net.load_state_dict(self._teacher_state)
            self._teacher_state = None
        for n in names[1:]:  # frozen: the teacher, and consistency's target (an EMA of the student)
            nets[n].requires_grad_(False)
            nets[n].eval()
        self.student, self.teacher, self.target = nets["model"], nets["teacher"], nets.get("target")
        return nets

    @property
    def consistency(self) -> bool:
        return self.cfg.method == "consistency"


    # ------------------------------------------------------------------ rounds
    @property
    def steps_now(self) -> tuple[int, int]:
        """(teacher steps, student steps) of the current round."""
        return self.cfg.round_of(self.round)

    def reached_steps(self, step: int) -> int:
        """The steps the student draws in at ``step``: its round's once that round has trained, else its teacher's
        (at step 0 the student is the teacher); a consistency student's are those it was asked for."""
        if self.consistency:
            return self.cfg.student_steps
        teacher, student = self.steps_now
        return student if step > self.round_start else teacher

    def _round_over(self, step: int) -> bool:
        cfg = self.cfg
        if step - self.round_start >= cfg.round_steps:
            return True
        if self._round_seconds is None:
            return False
        over = time.perf_counter() - self._round_t0 >= self._round_seconds
        if self.ctx.dist.enabled:  # every rank ends the round at the same step
            over = bool(self.ctx.dist.max_int(int(over), self.ctx.device))
        return over

    def _next_round(self, step: int) -> None:
        """The student as it stands becomes the teacher; the student goes on from its own weights."""
        self.round += 1
        self.round_start = step
        self.teacher.load_state_dict(self.student.state_dict())
        self._round_t0 = time.perf_counter()
        self.ctx.log(f"distill: round {self.round + 1} of {self.cfg.rounds} begins at step {step}: "
                     f"{self.steps_now[0]} teacher steps -> {self.steps_now[1]}")

    def lr_factor(self, step: int) -> float:
        """Linear decay to 0 over each round (by its steps, or by its time with --time-limit, whichever is further)."""
        done = (step - self.round_start) / self.cfg.round_steps
        if self._round_seconds is not None:
            done = max(done, (time.perf_counter() - self._round_t0) / self._round_seconds)
        return max(0.0, 1.0 - done)

    # ------------------------------------------------------------------ one step
    def batch(self, step: int):
        """(x0, y, student step index i, noise) of this rank's share of the global batch of ``step``; a round that
        is over hands over to the next first."""
        cfg, device = self.cfg, self.ctx.device
        if self._session_t0 is None:
            self._session_t0 = self._round_t0 = time.perf_counter()
            if cfg.time_limit is not None:  # the session's time shared evenly by the rounds it has left
                self._round_seconds = cfg.time_limit / (cfg.rounds - self.round)
        while self.round < cfg.rounds - 1 and self._round_over(step):
            self._next_round(step)
        x0, y, lo = self.images(step)  # label dropout: the null class keeps learning the unconditional model
        B, per = cfg.batch_size, x0.shape[0]
        if self._target_due:  # the EMA of the student after the last applied step (updated() came before it)
            self._update_target()
        # Salimans & Ho 2022, alg. 2: a student step i ~ U{1..N} per sample (here 0..N-1, see progressive_triples);
        # Song et al. 2023, alg. 2: a level n ~ U{1..N-1} (here 0..N-1, the pair of levels n, n + 1)
        n = self.cfg.cd_levels if self.consistency else self.steps_now[1]
        i_all = torch.randint(0, n, (B,), generator=self.gen, device=self.gen.device).to(device)
        noise_all = torch.randn((B,) + tuple(x0.shape[1:]), generator=self.gen, device=self.gen.device,
                                dtype=x0.dtype).to(device)
        return x0, y, i_all[lo:lo + per], noise_all[lo:lo + per]

    def _teacher(self, nets, y) -> Denoiser:
        """Round 0: the original teacher (guided at w for a class-conditional one); later: the last student."""
        clip = self.latent is None  # pixels: x0_hat clipped to [-1, 1], as sampling does; latents: never
        if self.round == 0:
            den = self.reading(nets["teacher"], self.teacher_objective, clip_x0=clip, null_cond=self.null_class,
                               cond=y)
            if y is not None and self.cfg.guidance:
                den = den.guided(self.cfg.guidance)
            return den
        return self.reading(nets["teacher"], clip_x0=clip, cond=y)

    def _consistency_loss(self, nets, x0, y, n, noise) -> LossOut:
        """Song et al. 2023, alg. 2 with the squared L2 distance: f_theta(z_{n+1}, t_{n+1}) against the target's
        f(z_hat_n, t_n), z_hat_n one teacher Heun step from z_{n+1}."""
        cfg = self.cfg
        t_hi, t_lo = self.levels[n + 1], self.levels[n]
        alpha, sigma = alpha_sigma(self.schedule, t_hi)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        z = (alpha.view(shape) * x0.double() + sigma.view(shape) * noise.double()).to(x0.dtype)  # DDPM eq. 4
        teacher = self._teacher(nets, y)
        target = self.reading(nets["target"], clip_x0=False, cond=y, consistency=cfg.sigma_data)
        student = self.reading(nets["model"], clip_x0=False, cond=y, consistency=cfg.sigma_data)
        goal = consistency_target(lambda zz, s: teacher(zz, s).x0, lambda zz, s: target(zz, s).x0, z, t_hi, t_lo,
                                  self.schedule)
        f = student(z, t_hi).x0
        losses = (f.float() - goal.float()).pow(2).flatten(1).mean(dim=1)
        return LossOut(losses.mean(), losses.detach(), t_hi.round().long())

    def _update_target(self) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta (Song et al. 2023, alg. 2)."""
        mu = self.cfg.target_ema
        with torch.no_grad():
            for p_t, p_s in zip(self.target.parameters(), self.student.parameters()):
                p_t.mul_(mu).add_(p_s.detach(), alpha=1.0 - mu)
            for b_t, b_s in zip(self.target.buffers(), self.student.buffers()):
                b_t.copy_(b_s)
        self._target_due = False

    def loss(self, name, batch, part: slice, nets) -> LossOut:
        x0, y, i, noise = batch
        y = None if y is None else y[part]
        if self.consistency:
            return self._consistency_loss(nets, x0[part], y, i[part], noise[part])
        teacher = self._teacher(nets, y)
        student = self.reading(nets["model"], clip_x0=False, cond=y)
        losses, t = progressive_loss(lambda z, s: student(z, s).x0, lambda z, s: teacher(z, s).x0, x0[part],
                                     noise[part], i[part], self.steps_now[1], self.schedule)
        return LossOut(losses.mean(), losses.detach(), t)

    def updated(self, name, per_sample, info) -> None:
        # the loop calls this just before the optimizer's step: the target follows at the next batch()
        self._target_due = self.consistency

    # ------------------------------------------------------------------ the run's files
    def config_json(self) -> dict:
        out = super().config_json()
        out["distill"] = self.cfg.distill_section(self.reached_steps(self.round_start))
        return out

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["distill"] = {"round": self.round, "round_start": self.round_start,
                            "teacher_objective": self.teacher_objective,
                            "teacher": {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}}
        if self.consistency:
            state["distill"]["target"] = {k: v.detach().clone() for k, v in self.target.state_dict().items()}
            state["distill"]["target_due"] = self._target_due
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        d = state["distill"]
        self.round, self.round_start = int(d["round"]), int(d["round_start"])
        self.teacher_objective = str(d["teacher_objective"])
        self.teacher.load_state_dict(d["teacher"])
        if self.consistency:
            self.target.load_state_dict(d["target"])
            self._target_due = bool(d["target_due"])

    # ------------------------------------------------------------------ pictures and quality
    def student_plan(self):
        """The current student's sampler over its ``trailing`` grid: DDIM at the round's steps, or the consistency
        sampler at the steps asked for."""
        from ...samplers.options import resolve

        if self.consistency:
            return resolve("consistency", self.schedule, self.cfg.student_steps, "trailing")
        return resolve("ddim", self.schedule, self.steps_now[1], "trailing")

    def denoiser(self, model: torch.nn.Module) -> Denoiser:
        """The student's Denoiser: its objective, x0 clipped for pixels, a consistency student's reading."""
        latent = self.latent is not None
        return self.reading(model, variance="small", clip_x0=not latent, null_cond=self.null_class,
                            decoder=self.latent.space.decode if latent else None,
                            consistency=self.cfg.sigma_data if self.consistency else None)

    def drawing(self, purpose: str) -> dict:
        """The grids and the --eval-every probe draw the current student with its own sampler, unguided: its
        network is guided already."""
        return {"sampler": self.student_plan(), "steps": None, "guidance": None}
