"""The settings of a distillation run (`ddpmkit distill`): the teacher's own settings, and how its student learns.

A :class:`DistillConfig` is a :class:`~ddpmkit.train.config.TrainConfig` (the student is a network of the teacher's
architecture, on the teacher's data, schedule and classes: those settings come from the teacher's config.json and
are fixed) with the fields of distillation added. Progressive distillation (Salimans & Ho 2022) halves the
student's steps once per round, from ``teacher_steps`` down to ``student_steps``; each round trains for
``round_steps`` optimizer steps (or its share of ``time_limit``), so the loop's ``steps`` is derived, not set.

The student's step count is the command's ``--steps`` (the flag users know from sampling): the loop's own ``steps``
(optimizer steps) is not a flag of `ddpmkit distill`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..limits import check_float, check_int
from .config import TrainConfig
from .settings import LoopSettings, default_of, setting, settings_from_json

__all__ = ["DistillConfig", "METHODS", "DISTILL_FLAGS", "distill_flag", "distill_fields"]

METHODS = ("progressive", "consistency")

# The settings of `ddpmkit distill` whose flag is not --<name>: the student's steps are --steps (the optimizer steps,
# LoopSettings.steps, follow from the rounds and have no flag there).
DISTILL_FLAGS = {"student_steps": "--steps"}


def distill_flag(name: str) -> str:
    """The `ddpmkit distill` flag of a setting."""
    return DISTILL_FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass
class DistillConfig(TrainConfig):
    """A distillation run: the teacher's :class:`TrainConfig` (objective: the student's) and how the student learns.

    The loop's defaults are replaced by fine-tuning ones: a smaller learning rate, no warm-up, no EMA (each round's
    student is the next round's teacher as it stands), and the learning rate decays to 0 over each round
    (``DistillTask.lr_factor``) instead of over the run.
    """

    teacher: str = setting("", "the trained run to distil (its EMA weights)", locked=True, metavar="RUN")
    method: str = setting("progressive", "progressive (Salimans & Ho 2022: each round halves the steps) or "
                                         "consistency (Song et al. 2023: one round that learns the ODE's end from "
                                         "any level; drawn in --steps steps by the consistency sampler)", locked=True)
    student_steps: int = setting(4, "sampling steps of the final student (a power-of-2 fraction of "
                                    "--teacher-steps)", locked=True)
    teacher_steps: int = setting(64, "DDIM steps of the teacher that the first round distils in half",
                                 locked=True)
    round_steps: int = setting(200, "optimizer steps per round (with --time-limit, a round also ends at its even "
                                    "share of the time); consistency distillation has one round", locked=True)
    cd_levels: int = setting(18, "consistency: the N noise levels between which the teacher takes one Heun step "
                                 "(EDM's spacing; Song et al. 2023 use N = 18 on CIFAR-10)", locked=True)
    target_ema: float = setting(0.95, "consistency: the EMA decay mu of the target network", locked=True)
    sigma_data: float = setting(0.5, "consistency: sigma_data of the boundary condition's c_skip", locked=True)
    guidance: float | None = setting(None, "class-conditional teacher: the classifier-free guidance weight the "
                                           "student learns to draw at (default: sampling's default weight); the "
                                           "student then draws guided in one network call per step", locked=True,
                                     metavar="W")
    objective: str = default_of(TrainConfig, "objective", "v", "what the student predicts: v (default) or x0; an "
                                                               "eps-predicting student cannot take large steps")
    lr: float = default_of(TrainConfig, "lr", 5e-4)
    warmup: int = default_of(TrainConfig, "warmup", 0)
    lr_decay: str = default_of(TrainConfig, "lr_decay", "none")
    ema_decay: float = default_of(TrainConfig, "ema_decay", 0.0)
    checkpoint_every: int = default_of(TrainConfig, "checkpoint_every", 200)
    sample_every: int = default_of(TrainConfig, "sample_every", 10**9)

    def __post_init__(self):
        self.steps = self.rounds * self.round_steps if self._rounds_ok() else 1

    # ------------------------------------------------------------------ rounds
    def _rounds_ok(self) -> bool:
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                   for v in (self.student_steps, self.teacher_steps, self.round_steps))
        if self.method == "consistency":
            return ints
        return ints and self.teacher_steps % self.student_steps == 0 and _power_of_two(
            self.teacher_steps // self.student_steps) and self.teacher_steps > self.student_steps

    @property
    def rounds(self) -> int:
        """Rounds of halving from ``teacher_steps`` to ``student_steps``; consistency distillation has one."""
        if self.method == "consistency":
            return 1
        return int(round(math.log2(self.teacher_steps // self.student_steps)))

    def round_of(self, r: int) -> tuple[int, int]:
        """(teacher steps, student steps) of round ``r`` (0-indexed)."""
        n = self.teacher_steps >> r
        return n, n // 2

    def validate(self) -> None:
        super().validate()
        for name in ("student_steps", "teacher_steps", "round_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{distill_flag(name)} must be a positive integer, got {v!r}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}: choose {' or '.join(METHODS)}")
        if self.objective not in ("v", "x0"):
            raise ConfigError(f"a student predicts v or x0 (--objective), got {self.objective!r}: an eps-predicting "
                              "network cannot take one large step, its x0 estimate at high noise divides by "
                              "alpha_t, near 0")
        if self.method == "consistency":
            if self.student_steps > self.T:
                raise ConfigError(f"--steps {self.student_steps} exceeds the teacher's T = {self.T} timesteps")
            check_int("--cd-levels", self.cd_levels, 1, self.T)
            check_float("--target-ema", self.target_ema, 0, 1, hi_open=True)
            if check_float("--sigma-data", self.sigma_data, 0, 1e3) <= 0:
                raise ConfigError(f"--sigma-data must be positive, got {self.sigma_data}")
        elif not self._rounds_ok():
            raise ConfigError(f"--teacher-steps {self.teacher_steps} must be --steps {self.student_steps} times a "
                              "power of 2 greater than 1 (each round halves the steps)")
        if self.method == "progressive" and self.teacher_steps > self.T:
            raise ConfigError(f"--teacher-steps {self.teacher_steps} exceeds the teacher's T = {self.T} timesteps")
        if self.guidance is not None:
            if not self.class_cond:
                raise ConfigError("--guidance: the teacher is unconditional, so there is nothing to guide")
            if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance)
                    and self.guidance >= 0):
                raise ConfigError(f"--guidance must be a number >= 0, got {self.guidance!r}")
        if not self.teacher:
            raise ConfigError("name the teacher run to distil")

    # ------------------------------------------------------------------ files
    def to_json(self, class_names=None, latent: dict | None = None) -> dict:
        """The student's config.json: a diffusion run of the student's objective, with a ``distill`` section that
        says how it draws (:meth:`distill_section`)."""
        out = super().to_json(class_names, latent)
        out["distill"] = self.distill_section()
        return out

    def distill_section(self, reached: int | None = None) -> dict:
        """What ``Run`` reads of a distilled run: the sampler its student was trained for (deterministic DDIM on the
        ``trailing`` timesteps), its steps (``reached``: the student's of the round it is in, once that round has
        trained; the teacher's before any step), the guidance it draws at, and where it came from."""
        out = {"method": self.method, "sampler": "ddim", "spacing": "trailing", "steps": self.student_steps,
               "reached_steps": self.teacher_steps if reached is None else int(reached),
               "teacher": self.teacher, "teacher_steps": self.teacher_steps, "guidance": self.guidance}
        if self.method == "consistency":  # read by Run.denoiser: the network's output is a consistency function
            out.update(sampler="consistency", reached_steps=self.student_steps, teacher_steps=None,
                       consistency={"sigma_data": self.sigma_data, "levels": self.cd_levels})
        return out

    @classmethod
    def from_json(cls, cfg: dict) -> "DistillConfig":
        return settings_from_json(cls, cfg)

    @classmethod
    def from_teacher(cls, teacher_cfg: TrainConfig, teacher: str, **overrides) -> "DistillConfig":
        """A new distillation of the run at ``teacher`` (its settings ``teacher_cfg``): the teacher's settings, the
        distillation defaults, ``overrides`` (None values ignored) on top."""
        own = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(TrainConfig)}
        # the teacher's data, model and diffusion settings; the loop's are the distillation's own (a teacher trained
        # with --time-limit 210 does not give its student 210 s), and so is the student's objective
        inherited = set(TrainConfig.__dataclass_fields__) - set(LoopSettings.__dataclass_fields__) - {"objective"}
        values = {k: v for k, v in dataclasses.asdict(teacher_cfg).items() if k in inherited}
        bad = sorted(set(overrides) - own - {"objective", *PICTURE_SETTINGS} - set(LOOP_OVERRIDABLE))
        if bad:
            raise ConfigError(f"not a setting of a distillation: {', '.join(bad)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("precond") == "edm" and overrides.get("objective") is None:
            values["objective"] = "x0"  # the student of an EDM teacher keeps its preconditioning: D predicts x0
        values["teacher"] = str(teacher)
        values.pop("steps", None)
        for f in dataclasses.fields(cls):
            if isinstance(f.default, tuple) and f.name in values:
                values[f.name] = tuple(values[f.name])
        return cls(**values)


# the loop settings `ddpmkit distill` takes as flags (LoopSettings' but `steps`, which the rounds give)
LOOP_OVERRIDABLE = ("time_limit", "batch_size", "grad_accum", "lr", "warmup", "grad_clip", "adam_beta1",
                    "adam_beta2", "weight_decay", "ema_decay", "ema_warmup", "seed", "log_every", "log",
                    "checkpoint_every", "sample_every", "eval_every", "keep", "skip_nonfinite", "device", "precision",
                    "compile")


# the student's sample grids and --eval-every measurements: its own to choose (the teacher's are inherited otherwise)
PICTURE_SETTINGS = ("num_samples", "eval_n")


def distill_fields() -> list[str]:
    """The settings that are flags of `ddpmkit distill`, in the order its help lists them: the distillation's own,
    then the loop's."""
    own = [f.name for f in dataclasses.fields(DistillConfig) if f.name not in TrainConfig.__dataclass_fields__]
    return own + ["objective", *PICTURE_SETTINGS, *LOOP_OVERRIDABLE]


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0
