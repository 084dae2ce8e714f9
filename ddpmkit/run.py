"""A trained run: the one way from a path a user hands in to a model, a schedule and a Denoiser.

``Run.open(path)`` accepts a run directory, ``RUN/checkpoints``, ``RUN/config.json``, a checkpoint directory
``RUN/checkpoints/step_N`` or a file inside one; anything else is a one-line CheckpointError. The storage
below it (``ddpmkit.store``) knows files and tensors; this module is where they meet the U-Net and the
diffusion settings of ``config.json``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .diffusion import NoiseSchedule
from .errors import CheckpointError, ConfigError, DdpmkitError
from .store.checkpoint import Checkpoint, check_state_matches, load_checkpoint, locate, strip_wrappers
from .gamma import GAMMA_FILE, estimate_run_gamma
from .store.rundir import CONFIG_NAME, read_config

if TYPE_CHECKING:  # pragma: no cover
    from .diffusion import Denoiser

__all__ = ["Run", "GAMMA_FILE", "ON_THE_FLY_GAMMA_N", "RUN_KINDS", "open_autoencoder"]

RUN_KINDS = ("diffusion", "autoencoder")  # config.json's "kind": what a run's model is

ON_THE_FLY_GAMMA_N = 32  # images of the estimate made when a run asked for the analytic variance has none


class Run:
    """A run directory and, optionally, one of its checkpoints.

    ``dir`` is the run directory, ``config`` its config.json, ``checkpoint_dir`` the checkpoint the user
    named (None: the newest intact one, found when the weights are loaded).
    """

    def __init__(self, dir, config: dict, checkpoint_dir=None):
        self.dir = Path(dir)
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._loaded: tuple[Checkpoint, frozenset, bool] | None = None  # read once: (checkpoint, parts, verified)
        self._latent_space = None  # a latent run's LatentSpace, loaded once (latent_space)

    @classmethod
    def open(cls, path) -> Run:
        """The run of ``path``; CheckpointError (one line) when ``path`` is not a run or one of its checkpoints."""
        where = locate(path)
        if where.run_dir is None:
            ck = where.checkpoint
            raise CheckpointError(f"cannot use checkpoint {ck}: its run directory ({ck.parent.parent}) has no "
                                  f"{CONFIG_NAME}")
        return cls(where.run_dir, read_config(where.run_dir), where.checkpoint)

    def __repr__(self) -> str:
        at = f", checkpoint_dir={str(self.checkpoint_dir)!r}" if self.checkpoint_dir is not None else ""
        return f"Run({str(self.dir)!r}{at})"

    # ------------------------------------------------------------------ settings from config.json
    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_NAME

    @property
    def kind(self) -> str:
        """What the run trains: ``"autoencoder"`` (config.json's ``"kind"``) or ``"diffusion"`` (the default: runs
        written before the field existed are diffusion runs)."""
        kind = self.config.get("kind", "diffusion")
        if kind not in RUN_KINDS:
            raise CheckpointError(f"{self.config_path}: unknown kind {kind!r} (expected {' or '.join(RUN_KINDS)})")
        return kind

    def _section(self, name: str) -> dict[str, Any]:
        section = self.config.get(name)
        if type(section) is not dict:
            raise CheckpointError(f"{self.config_path} has no '{name}' section")
        return section

    @property
    def diffusion_config(self) -> dict[str, Any]:
        """``config["diffusion"]`` (empty when absent)."""
        section = self.config.get("diffusion")
        return section if type(section) is dict else {}

    @cached_property
    def schedule(self) -> NoiseSchedule:
        """The NoiseSchedule of ``config["diffusion"]``: "schedule" (linear or cosine) and "T", or explicit
        "betas" (the schedule of an imported model that is neither)."""
        diffusion = self.config.get("diffusion")
        if type(diffusion) is not dict or "schedule" not in diffusion or "T" not in diffusion:
            raise CheckpointError(f"{self.config_path} has no 'diffusion' section with 'schedule' and 'T'")
        from .limits import check_T

        check_T(diffusion["T"], f"{self.config_path}: diffusion.T", CheckpointError)  # before any allocation
        try:
            if "betas" in diffusion:
                schedule = NoiseSchedule.from_betas(diffusion["betas"], kind=str(diffusion["schedule"]))
                if schedule.T != diffusion["T"]:
                    raise ValueError(f"{schedule.T} betas for T={diffusion['T']}")
                return schedule
            return NoiseSchedule.from_name(diffusion["schedule"], diffusion["T"])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{self.config_path}: bad diffusion settings: {e}") from e

    @property
    def objective(self) -> str:
        """What the network predicts: ``config["diffusion"]["objective"]``, "eps" when absent."""
        return self._setting("objective", "eps")

    @property
    def variance(self) -> str:
        """The reverse-process variance: ``config["diffusion"]["variance"]``, "small" when absent."""
        return self._setting("variance", "small")

    @property
    def learn_sigma(self) -> bool:
        """Whether the network has twice the image channels (a learned variance, Improved DDPM)."""
        model = self.config.get("model")
        if type(model) is not dict or model.get("out_channels") is None:
            return False
        return model.get("out_channels") == 2 * model.get("in_channels", -1)

    @property
    def precond_sigma_data(self) -> float | None:
        """The sigma_data of a network trained with EDM's preconditioning (``ddpmkit train --precond edm``;
        config.json's ``diffusion.precond``), read by ``Denoiser(precond=...)``; None for any other run."""
        p = self.diffusion_config.get("precond")
        if p is None:
            return None
        sd = p.get("sigma_data") if type(p) is dict and p.get("kind") == "edm" else None
        if isinstance(sd, bool) or not isinstance(sd, (int, float)) or not 0 < sd < float("inf"):
            raise CheckpointError(f"{self.config_path}: diffusion.precond must be {{\"kind\": \"edm\", "
                                  f"\"sigma_data\": a positive number}}, got {p!r}")
        if self.objective != "x0":
            raise CheckpointError(f"{self.config_path}: an EDM-preconditioned network predicts x0, and "
                                  f"diffusion.objective is {self.objective!r}")
        return float(sd)

    # ------------------------------------------------------------------ the analytic variance
    def gamma(self) -> torch.Tensor | None:
        """Gamma_t (float64 [T]) stored by ``ddpmkit eval variance``, or None when the run has none (a resume
        rewrites config.json without the note: the weights changed, so the old estimate no longer applies)."""
        note = self.diffusion_config.get("analytic")
        path = self.dir / GAMMA_FILE
        if type(note) is not dict or not path.is_file():
            return None
        from .store.state import load_safetensors

        gamma = load_safetensors(path).get("gamma")
        if gamma is None or gamma.ndim != 1 or gamma.shape[0] != self.schedule.T:
            raise CheckpointError(f"{path} does not hold Gamma_t for the {self.schedule.T} timesteps of this run")
        return gamma.double()

    def save_gamma(self, gamma: torch.Tensor, note: dict):
        """Store Gamma_t in the run (``GAMMA_FILE``) and its note in config.json's ``diffusion.analytic``."""
        from .store.rundir import write_config
        from .store.state import atomic_save_safetensors

        path = atomic_save_safetensors({"gamma": gamma.double().cpu()}, self.dir / GAMMA_FILE,
                                       metadata={k: str(v) for k, v in note.items()})
        config = read_config(self.dir)
        config.setdefault("diffusion", {})["analytic"] = dict(note)
        write_config(self.dir, config)
        self.config = config
        return path

    def _setting(self, key: str, default: str) -> str:
        value = self.diffusion_config.get(key, default)
        if type(value) is not str:
            raise CheckpointError(f"{self.config_path}: diffusion.{key} must be a string, got {value!r}")
        return value

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model makes, from ``config["model"]``."""
        model = self._section("model")
        try:
            c, s = int(model["in_channels"]), int(model["image_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the 'model' section of {self.config_path} lacks a valid in_channels and "
                                  f"image_size ({e})") from e
        from .limits import MAX_CHANNELS, MAX_IMAGE_SIZE, check_int

        check_int(f"{self.config_path}: model.in_channels", c, 1, MAX_CHANNELS, CheckpointError)
        check_int(f"{self.config_path}: model.image_size", s, 1, MAX_IMAGE_SIZE, CheckpointError)
        return (c, s, s)

    # ------------------------------------------------------------------ a latent run
    @property
    def latent_section(self) -> dict | None:
        """config.json's ``latent`` section of a latent diffusion run (None for a pixel run, and for an autoencoder
        run, whose ``latent`` section describes its own latents)."""
        section = self.config.get("latent")
        if self.kind == "autoencoder" or type(section) is not dict or "scale" not in section:
            return None
        return section

    @property
    def is_latent(self) -> bool:
        """Whether the run diffuses an autoencoder's latents (``ddpmkit train --autoencoder``)."""
        return self.latent_section is not None

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the run makes: :attr:`image_shape` for a pixel run, the decoded images' for a
        latent run."""
        section = self.latent_section
        if section is None:
            return self.image_shape
        shape = section.get("image_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and v > 0 for v in shape)):
            raise CheckpointError(f"{self.config_path}: latent.image_shape must be [C, H, W], got {shape!r}")
        return tuple(shape)

    def latent_space(self):
        """A latent run's :class:`~ddpmkit.latent.LatentSpace`: its copy of the autoencoder (``RUN/autoencoder``),
        checked against the hash it trained with, and its scale; loaded once, on the CPU."""
        if self._latent_space is not None:
            return self._latent_space
        section = self.latent_section
        if section is None:
            raise CheckpointError(f"{self.dir} is not a latent diffusion run")
        from .latent import AUTOENCODER_DIR, LatentSpace

        path = self.dir / AUTOENCODER_DIR
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{self.dir} is a latent run without its autoencoder ({path} is missing)")
        ae, _, ae_hash = open_autoencoder(path)
        if section.get("autoencoder_hash") not in (None, ae_hash):
            raise CheckpointError(f"{path} is not the autoencoder {self.dir} was trained with (its hash changed)")
        self._latent_space = LatentSpace.from_section(ae, section)
        return self._latent_space

    # ------------------------------------------------------------------ classes
    @property
    def num_class_embeds(self) -> int | None:
        """Rows of the model's class embedding (``config["model"]["num_class_embeds"]``); None: unconditional."""
        n = self._section("model").get("num_class_embeds")
        if n is not None and (type(n) is not int or n < 1):
            raise CheckpointError(f"{self.config_path}: model.num_class_embeds must be a positive integer, got {n!r}")
        return n

    @property
    def class_cond(self) -> bool:
        """Whether the model takes class labels."""
        return self.num_class_embeds is not None

    @cached_property
    def _classes(self) -> tuple[tuple[str, ...] | None, int | None]:
        n = self.num_class_embeds
        if n is None:
            return None, None
        section = self.config.get("classes")
        if section is None:  # e.g. an imported model: its labels unnamed, and no null class known
            return tuple(str(k) for k in range(n)), None
        names, null = (section.get("names"), section.get("null")) if type(section) is dict else (None, None)
        if (type(names) is not list or not all(type(c) is str for c in names) or type(null) is not int
                or null != len(names) or n != len(names) + 1):
            raise CheckpointError(f"{self.config_path}: the 'classes' section does not fit a class embedding of "
                                  f"{n} rows (it needs 'names' of {n - 1} strings and 'null': {n - 1})")
        return tuple(names), null

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The names of the labels 0..K-1 of a class-conditional run (``config["classes"]["names"]``); None for an
        unconditional one."""
        return self._classes[0]

    @property
    def null_class(self) -> int | None:
        """The label of the null class ("no class", for classifier-free guidance); None when the model has none."""
        return self._classes[1]

    # ------------------------------------------------------------------ a distilled student
    @property
    def distilled(self) -> dict | None:
        """A distilled student's ``distill`` section (``ddpmkit distill``), None for any other run."""
        section = self.config.get("distill")
        if section is None:
            return None
        if type(section) is not dict or not isinstance(section.get("sampler"), str):
            raise CheckpointError(f"{self.config_path}: the 'distill' section has no sampler")
        return section

    def sampling_defaults(self) -> dict:
        """The sampler, steps and spacing this run draws with when a request names none: a distilled student's
        own (DDIM over its trailing grid, at the steps of its last round), {} for any other run."""
        d = self.distilled
        if d is None:
            return {}
        steps = d.get("reached_steps", d.get("steps"))
        if type(steps) is not int or not 1 <= steps <= self.schedule.T:
            raise CheckpointError(f"{self.config_path}: distill.reached_steps must be an integer in [1, T], got "
                                  f"{steps!r}")
        return {"sampler": d["sampler"], "steps": steps, "spacing": d.get("spacing")}

    @property
    def consistency_sigma_data(self) -> float | None:
        """A consistency-distilled student's sigma_data: its network's output is read as a consistency function
        (``Denoiser(consistency=...)``); None for any other run."""
        d = self.distilled
        c = None if d is None else d.get("consistency")
        if c is None:
            return None
        sd = c.get("sigma_data") if type(c) is dict else None
        if isinstance(sd, bool) or not isinstance(sd, (int, float)) or not sd > 0:
            raise CheckpointError(f"{self.config_path}: distill.consistency.sigma_data must be a positive number")
        return float(sd)

    @property
    def distilled_guidance(self) -> float | None:
        """The classifier-free guidance weight a distilled student's network draws at by itself (its teacher's
        weight when it was distilled); None for an unguided student or any other run."""
        d = self.distilled
        w = None if d is None else d.get("guidance")
        return None if w is None else float(w)

    # ------------------------------------------------------------------ weights
    def checkpoint(self, *, verify: bool = True, map_location="cpu",
                   parts: tuple[str, ...] = ("model", "ema", "optimizer", "train")) -> Checkpoint:
        """The checkpoint this run names (or its newest intact one), loaded and verified.

        Its files are read once per Run: a later call asking for no more parts (and no stronger check) gets the
        same Checkpoint, whose tensors are on the CPU (``map_location`` other than the CPU reads anew).
        """
        want = frozenset(parts)
        cached = self._loaded
        if (cached is not None and str(map_location) == "cpu" and want <= cached[1]
                and (cached[2] or not verify)):
            return cached[0]
        if cached is not None:
            want |= cached[1]
            verify = verify or cached[2]
        ck = load_checkpoint(self.checkpoint_dir or self.dir, verify=verify, map_location=map_location,
                             parts=tuple(sorted(want)), config=self.config)
        if str(map_location) == "cpu":
            self._loaded = (ck, want, verify)
        return ck

    def build_model(self):
        """The run's network as config.json's ``model`` section describes it, with fresh weights: the U-Net of a
        diffusion run, the :class:`~ddpmkit.models.autoencoder.AutoencoderKL` of an autoencoder run."""
        model_cfg = self._section("model")
        where = f"the 'model' section of {self.config_path}"
        # the network code is imported only when a model is built; every number is checked and the size counted
        # on the meta device, before a byte is allocated
        if self.kind == "autoencoder":
            from .limits import check_autoencoder_config
            from .models.autoencoder import AutoencoderKL as net_class

            check_autoencoder_config(model_cfg, where, CheckpointError)
        else:
            from .limits import check_model_config
            from .models.unet import UNet as net_class

            check_model_config(model_cfg, where, CheckpointError)
        try:
            return net_class.from_config(model_cfg)
        except (DdpmkitError, TypeError, ValueError, KeyError) as e:
            what = "an autoencoder" if self.kind == "autoencoder" else "a U-Net"
            raise CheckpointError(f"{where} does not describe a valid {what}: {e}") from e

    def load_model(self, ema: bool = True, verify: bool = True):
        """The run's network (the U-Net, or an autoencoder run's autoencoder) with its EMA weights (``ema=True``,
        falling back to the raw weights when no EMA was saved) or its raw weights, in eval mode on the CPU.

        The architecture comes from ``config["model"]``. Keys and shapes are checked strictly; a mismatch is
        a CheckpointError naming it.
        """
        ck = self.checkpoint(verify=verify, parts=("model", "ema", "train"))  # the train state for its step
        model = self.build_model()
        use_ema = ema and ck.ema_state is not None
        state = ck.ema_state if use_ema else ck.model_state
        what = f"the {'EMA' if use_ema else 'model'} weights of checkpoint {ck.path}"
        expected = model.state_dict()
        state = strip_wrappers(state, expected)
        check_state_matches(state, expected, what)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{what} cannot be loaded into the model: {e}") from e
        if self._loaded is not None and self._loaded[0] is ck:  # the weights live in the model now: keep only the
            import dataclasses  # small parts of the read (step, train state), not a second copy of the weights

            self._loaded = (dataclasses.replace(ck, model_state={}, ema_state=None),
                            self._loaded[1] - {"model", "ema"}, self._loaded[2])
        return model.to("cpu").eval()

    def denoiser(self, ema: bool = True, variance: str | None = None, clip_x0: bool = True,
                 device=None, guidance: float | None = None) -> Denoiser:
        """A Denoiser over the run's model (on ``device``, default the CPU), schedule and objective.

        ``variance`` defaults to the run's (``config["diffusion"]["variance"]`` or "small"). A class-conditional
        run's Denoiser knows its null class and refuses a call without labels: give them with ``with_cond`` (a
        tensor [B], or one int; ``null_class`` for the unconditional model) and a guidance weight here (or with
        ``guided``). The analytic variance refuses a guidance weight: its Gamma_t is the unguided model's.

        A latent run's Denoiser works on latents, never clips x0 (latents are not bounded as pixels are), and
        decodes with the run's autoencoder (:meth:`Denoiser.to_pixels`, which ``sample_batches`` applies).
        """
        from .diffusion import Denoiser
        from .diffusion.process import check_objective

        schedule = self.schedule
        objective = self.objective
        try:
            check_objective(objective)
        except ValueError as e:
            raise CheckpointError(f"{self.config_path}: bad diffusion settings: {e}") from e
        variance = self.variance if variance is None else variance
        from .diffusion import VARIANCES

        if variance not in VARIANCES:
            raise CheckpointError(f"unknown variance {variance!r}: choose one of {', '.join(VARIANCES)}")
        if variance == "learned" and not self.learn_sigma:
            raise CheckpointError(f"{self.dir} cannot use the learned variance: its network was not trained with "
                                  "--learn-sigma (choose small, large or analytic)")
        gamma = None
        if variance == "analytic" and guidance:
            # Gamma_t = E||eps_theta||^2 / d is measured on the model's own predictions (Analytic-DPM); guided ones
            # are another quantity, so the stored or estimated Gamma_t would not be the optimal variance for them
            raise ConfigError(f"the analytic variance cannot be used with guidance w = {guidance:g}: its Gamma_t "
                              "holds for the unguided model only; use --guidance 0, or --variance small or large")
        if variance == "analytic":
            gamma = self.gamma()
            if gamma is None:
                import sys

                print(f"note: {self.dir} has no Gamma_t for the analytic variance; estimating it now from "
                      f"{ON_THE_FLY_GAMMA_N} images (store one with `ddpmkit eval variance {self.dir}`)",
                      file=sys.stderr)
                gamma = estimate_run_gamma(self, n=ON_THE_FLY_GAMMA_N, ema=ema)[0]
        net = self.load_model(ema=ema)
        if device is not None:
            net = net.to(device)
        if torch.device(device or "cpu").type == "cpu":
            # channels_last on the CPU, for every command that samples (sample, eval, edit, inpaint): side by side
            # on an AVX2 CPU, DDIM over the CIFAR-10 model took 15-19% less time, over the small digits model the
            # same time (bench/bench_sampling_vs_diffusers.py --channels-last)
            net = net.to(memory_format=torch.channels_last)
        if guidance and self.null_class is None:
            raise CheckpointError(f"{self.dir} has no null class, so it cannot be guided: "
                                  + ("it is unconditional" if not self.class_cond else
                                     "its model was not trained with ddpmkit's label dropout"))
        w_student = self.distilled_guidance
        if w_student is not None:  # the student's network is the guided teacher already: it is not guided again
            if guidance is not None and abs(float(guidance) - w_student) > 1e-9:
                raise ConfigError(f"{self.dir} is a student distilled at guidance w = {w_student:g}: it draws at "
                                  f"that weight only (distil its teacher again with --guidance {guidance:g})")
            guidance = None
        decoder = None
        if self.is_latent:  # latents are not bounded by [-1, 1]: no clipping; samples are decoded into images
            clip_x0 = False
            decoder = self.latent_space().to(device or "cpu").decode
        return Denoiser(net, schedule, objective=objective, variance=variance, clip_x0=clip_x0,
                        guidance=guidance, null_cond=self.null_class, gamma=gamma, decoder=decoder,
                        consistency=self.consistency_sigma_data, precond=self.precond_sigma_data)


def open_autoencoder(path):
    """(the autoencoder, its run's config.json, its hash) of an autoencoder run at ``path``, EMA weights, eval mode,
    frozen; a one-line CheckpointError when ``path`` is no autoencoder run."""
    run = Run.open(path)
    if run.kind != "autoencoder":
        raise CheckpointError(f"{path} is a diffusion run, not an autoencoder: train one with `ddpmkit autoencoder "
                              "train`, or import a diffusers AutoencoderKL with `ddpmkit import-diffusers`")
    model = run.load_model(ema=True)
    model.requires_grad_(False)
    from .latent import state_hash

    return model, run.config, state_hash(model.config, model.state_dict())
