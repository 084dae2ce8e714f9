"""Interop with the diffusers file format: :func:`import_diffusers` and :func:`export_diffusers`, which tell the
kinds of model and run apart, and the U-Net's pipeline folders. A ``UNet2DModel`` and its scheduler are read into a
ddpmkit run, and a run is written back out as a diffusers ``DDPMPipeline`` folder (a class-conditional run, or one
trained with EDM's preconditioning: a folder with its own ``pipeline.py``, see :func:`export_diffusers`). A latent
diffusion run exports as an ``LDMPipeline`` folder (its autoencoder in ``vqvae/``), or as a folder with its own
pipeline and a ``vae/`` where LDMPipeline cannot run it; either imports back as a latent run.

An ``AutoencoderKL`` and an autoencoder run, and the autoencoder and latent map of a latent pipeline, are
:mod:`.diffusers_latent`'s; the files (hub ids, finding the model and its scheduler, weights, ``class_names.json``,
the export folder) are :mod:`.diffusers_files`'s. Like those, this module never imports diffusers. The translation
of configs and weight names between the two U-Nets is :mod:`.diffusers_convert`'s, between the two autoencoders
:mod:`.diffusers_vae`'s.

A class-conditional run exports with ``num_class_embeds`` = its classes + 1 (the null class last), and its class
names and null label go into ``unet/class_names.json`` beside the config, which an import reads back. A diffusers
model imported without that file keeps its labels 0..N-1, unnamed, and no null class (so it cannot be guided).

A run trained with EDM's preconditioning (``--precond edm``) exports with its sigma_data as ``precond_sigma_data`` in
``model_index.json``, which the folder's pipeline applies and an import reads back into the run's
``diffusion.precond``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..files import atomic_write_json, atomic_write_text, read_json_object
from ..latent import LatentSpace
from ..models.unet import UNet
from ..run import Run
from ..store import prepare_run_dir, save_checkpoint, write_config
from .diffusers_convert import (diffusers_config_from_unet, diffusion_from_scheduler, scheduler_from_diffusion,
                                state_from_diffusers, state_to_diffusers, unet_config_from_diffusers)
from .diffusers_files import (CLASSES_FILE, SCHEDULER_FILE, find_model_dir, find_scheduler, imported_run_config,
                              load_model, make_out_dir, read_classes, resolve_source, write_model)
from .diffusers_files import WEIGHT_FILES  # noqa: F401  (importable from here as well)
from .diffusers_latent import (LDM_PIPELINE, VAE_CLASS, autoencoder_export, export_vae, find_latent_vae,
                               find_vae_dir, import_vae, read_latent_pipeline, write_latent_copy)
from .diffusers_latent import DIFFUSERS_SCALING_FACTOR  # noqa: F401  (importable from here as well)
from .diffusers_vae import (autoencoder_config_from_diffusers, diffusers_config_from_autoencoder,
                            state_from_diffusers_vae, state_to_diffusers_vae)

__all__ = ["import_diffusers", "export_diffusers", "unet_config_from_diffusers", "diffusers_config_from_unet",
           "state_from_diffusers", "state_to_diffusers", "diffusion_from_scheduler", "scheduler_from_diffusion",
           "autoencoder_config_from_diffusers", "diffusers_config_from_autoencoder", "state_from_diffusers_vae",
           "state_to_diffusers_vae"]

PIPELINE_FILE = "pipeline.py"  # an export's own pipeline (class-conditional, EDM's, or a latent map of its own)
PIPELINE_CLASS = "ClassConditionalDDPMPipeline"
UNCONDITIONAL_PIPELINE_CLASS = "UnconditionalDDPMPipeline"  # ours, for an EDM run DDPMPipeline cannot read
LATENT_PIPELINE_CLASS = "LatentDDPMPipeline"  # the same, by the name unconditional latent exports have always had
PRECOND_KEY = "precond_sigma_data"  # model_index.json: EDM's sigma_data of a preconditioned U-Net
LDM_STEPS = 50  # LDMPipeline's default number of DDIM steps, in the call an export prints

# ---------------------------------------------------------------------------------------------- import


def import_diffusers(source: str, out_dir, *, log=print) -> Path:
    """Convert a diffusers ``UNet2DModel`` (and its scheduler config) into a new ddpmkit run directory, or a
    diffusers ``AutoencoderKL`` (its own folder, or the ``vae/`` of a pipeline without a UNet2DModel, such as Stable
    Diffusion's) into a new autoencoder run (config.json's ``"kind": "autoencoder"``).

    Everything is read and converted in memory first; the run directory is written only when the weights load
    strictly into the network that the config describes. ``out_dir`` must not exist or be empty.
    """
    root = resolve_source(source)
    vae_dir = find_vae_dir(root)
    if vae_dir is not None:
        return import_vae(source, vae_dir, out_dir, log=log)
    return _import_unet(source, root, out_dir, log=log)


def _import_unet(source: str, root: Path, out_dir, *, log=print) -> Path:
    """A run from the UNet2DModel at ``root`` (or its ``unet/``) and its scheduler; a latent run when ``root`` is a
    latent diffusion pipeline, with its own copy of the pipeline's autoencoder."""
    latent_vae = find_latent_vae(root)
    model_dir = find_model_dir(root)
    dcfg = read_json_object(model_dir / "config.json", error=CheckpointError)
    cfg = unet_config_from_diffusers(dcfg)
    sched_path = find_scheduler(root, model_dir)
    scfg = read_json_object(sched_path, error=CheckpointError) if sched_path is not None else {}
    diffusion = diffusion_from_scheduler(scfg)
    sigma_data = _read_precond(root, model_dir, diffusion)
    if sigma_data is not None:
        diffusion["precond"] = {"kind": "edm", "sigma_data": sigma_data}  # what Run.precond_sigma_data reads
    learned_out = cfg.get("out_channels") == 2 * cfg["in_channels"]
    if (diffusion["variance"] == "learned") != learned_out:
        raise ConfigError(f"the scheduler's variance_type={scfg.get('variance_type')!r} does not fit a U-Net with "
                          f"{cfg['in_channels']} input and {cfg.get('out_channels')} output channels")
    model = load_model(model_dir, UNet, cfg, state_from_diffusers)

    classes = read_classes(model_dir, cfg)
    latent = None if latent_vae is None else read_latent_pipeline(root, latent_vae, cfg)

    run = prepare_run_dir(out_dir, resume=False)
    save_checkpoint(run, 0, model_state=model.state_dict(), keep=None)
    config = imported_run_config(cfg, source, {"unet_config": dict(dcfg),
                                               "scheduler_config": dict(scfg) if scfg else None}, diffusion=diffusion)
    if classes is not None:
        config["classes"] = classes
    if latent is not None:  # the run's own copy of the autoencoder first, config.json's latent section after it
        config["latent"], config["data"] = write_latent_copy(run, latent, source)
    write_config(run, config)  # last: a folder without config.json is not taken for a run
    n = sum(p.numel() for p in model.parameters())
    what = (f"U-Net at {cfg['image_size']}x{cfg['image_size']}" if latent is None else
            f"latent diffusion U-Net on {'x'.join(map(str, config['latent']['shape']))} latents of a "
            f"{latent.model.num_parameters():,}-parameter KL autoencoder (f={latent.model.factor}, "
            f"{'x'.join(map(str, config['latent']['image_shape']))} images, {latent.describe()})")
    log(f"imported {source}: a {n:,}-parameter {what}, "
        f"{diffusion['schedule']} schedule, T={diffusion['T']}, objective {diffusion['objective']}, "
        f"variance {diffusion['variance']}"
        + ("" if sigma_data is None else f", EDM's preconditioning (sigma_data {sigma_data:g})")
        + ("" if sched_path else " (no scheduler config: the paper's defaults)"))
    return run


def _read_precond(root: Path, model_dir: Path, diffusion: dict) -> float | None:
    """EDM's sigma_data of the pipeline at ``root`` (``precond_sigma_data`` in its ``model_index.json``, as ddpmkit's
    exports write it; the pipeline's around it when SOURCE is its ``unet/``, whose scheduler is read from there too),
    checked against the scheduler's objective; None when there is none."""
    path = root / "model_index.json"
    if not path.is_file() and model_dir == root and root.name == "unet":
        path = root.parent / "model_index.json"
    index = read_json_object(path, error=CheckpointError) if path.is_file() else {}
    sd = index.get(PRECOND_KEY)
    if sd is None:
        return None
    if isinstance(sd, bool) or not isinstance(sd, (int, float)) or not 0 < sd < float("inf"):
        raise CheckpointError(f"{path}: {PRECOND_KEY} must be EDM's sigma_data, a positive number, got {sd!r}")
    if diffusion["objective"] != "x0":
        raise CheckpointError(f"{path} names EDM's preconditioning ({PRECOND_KEY}={sd:g}), whose U-Net gives the "
                              "clean image, but its scheduler's prediction_type is not 'sample'")
    return float(sd)


# ---------------------------------------------------------------------------------------------- export


def export_diffusers(run_dir, out_dir, *, ema: bool = True, log=print) -> Path:
    """Write a ddpmkit run as a diffusers pipeline folder: ``model_index.json``, ``unet/`` (config and safetensors
    weights) and ``scheduler/scheduler_config.json``. ``out_dir`` must not exist or be empty.

    An unconditional run is a ``DDPMPipeline``. A class-conditional one, which DDPMPipeline cannot run (it passes
    no labels), also gets ``pipeline.py`` (a copy of :mod:`ddpmkit.interop.diffusers_pipeline`), named in
    ``model_index.json`` with its null class: ``DiffusionPipeline.from_pretrained(out_dir, trust_remote_code=True)``
    loads it, and ``pipe(class_labels=[...], guidance=w)`` samples with classifier-free guidance.

    A run trained with EDM's preconditioning (``--precond edm``) also gets ``pipeline.py``, unconditional
    (``UnconditionalDDPMPipeline``, ``pipe(batch_size=4)``) or not, with ``precond_sigma_data`` in
    ``model_index.json``: the pipeline calls the U-Net on (c_in x, c_noise) and hands the scheduler EDM's D, the
    clean image, so the scheduler's ``prediction_type`` is ``"sample"`` (the run's objective, x0). Neither
    DDPMPipeline nor LDMPipeline can do that, so this holds for a latent EDM run too.

    A latent diffusion run also writes its copy of the autoencoder (``RUN/autoencoder``) as a diffusers
    ``AutoencoderKL``, and the scheduler does not clip x0 (ddpmkit never clips latents):

    - unconditional, with one scale and no shift (a scale measured by ddpmkit, or a VAE's own scaling_factor): an
      ``LDMPipeline`` folder, its autoencoder in ``vqvae/`` with ``scaling_factor`` = the run's scale, and a
      ``DDIMScheduler`` (LDM's sampler; set_alpha_to_one, leading spacing: ddpmkit's uniform DDIM whenever the steps
      divide T), a ``DDPMScheduler`` for a learned variance, which DDIMScheduler cannot step.
      ``LDMPipeline.from_pretrained(out_dir)`` loads it (its ``vqvae`` is annotated as a VQModel: diffusers logs
      that it got an AutoencoderKL, and decodes it all the same: ``vqvae.decode(z / scaling_factor).sample``);
    - unconditional with a per-channel scale or a shift (``latents_mean``/``latents_std`` or ``shift_factor`` of
      the VAE it trained on), which LDMPipeline cannot apply (it divides by one scaling_factor and shifts nothing):
      the folder's own ``LatentDDPMPipeline`` (an ``UnconditionalDDPMPipeline``) in ``pipeline.py``, with the
      autoencoder in ``vae/`` and the exact map in ``model_index.json`` (``latent_scale``, ``latent_shift``), loaded
      as a class-conditional export is (and so is an unconditional latent EDM run);
    - class-conditional: the ``ClassConditionalDDPMPipeline`` with the autoencoder in ``vae/`` and the map in
      ``model_index.json``; its images are decoded.

    ``import_diffusers`` reads each of these back into a latent run.

    An autoencoder run (config.json's ``"kind": "autoencoder"``) is written as a diffusers ``AutoencoderKL``
    folder instead: ``config.json`` (with the run's ``latent`` statistics) and its safetensors weights, which
    ``AutoencoderKL.from_pretrained(out_dir)`` loads.
    """
    run = Run.open(run_dir)
    if run.kind == "autoencoder":
        return export_vae(run, run_dir, Path(out_dir), ema=ema, log=log)
    if run.consistency_sigma_data is not None:
        raise ConfigError(f"{run.dir} is a consistency-distilled student: its network is read through ddpmkit's "
                          "consistency function, which no diffusers scheduler applies; export its teacher "
                          f"({run.distilled.get('teacher')}) instead, or a progressive student")
    out = _export_unet(run, run_dir, Path(out_dir), ema=ema, log=log)
    if run.distilled is not None:
        steps = run.sampling_defaults()["steps"]
        w = run.distilled_guidance
        log(f"note: {run_dir} is a distilled student: its scheduler is a DDIMScheduler on trailing timesteps; draw "
            f"it with num_inference_steps={steps}" + (f" and guidance=0 (its network is guided already, at w = {w:g})"
                                                      if w is not None else ""))
    return out


def _export_unet(run: Run, run_dir, out: Path, *, ema: bool, log=print) -> Path:
    """A run of a U-Net, pixel or latent, as a pipeline folder: DDPMPipeline, LDMPipeline, or its own pipeline."""
    # a latent run's autoencoder copy is read and checked (present, its hash) before anything is written
    space = run.latent_space() if run.is_latent else None
    precond = run.precond_sigma_data  # EDM's sigma_data: only the folder's own pipeline applies it
    model = run.load_model(ema=ema)
    diffusion = run.diffusion_config
    dcfg = diffusers_config_from_unet(model.config)
    scfg = scheduler_from_diffusion(diffusion)
    if run.distilled is not None:  # a progressive student takes DDIM steps on the trailing grid it was trained for
        scfg = dict(_ddim_scheduler(scfg), timestep_spacing="trailing")
    state = state_to_diffusers(model.state_dict(), model.config)
    vae = None
    if space is not None:
        scfg["clip_sample"] = False  # ddpmkit's Denoiser never clips latents: they are not bounded by [-1, 1]
        ldm = not run.class_cond and precond is None and _ldm_can_apply(space)
        if ldm and diffusion.get("variance") != "learned":
            scfg = _ddim_scheduler(scfg)
        vae = ("vqvae" if ldm else "vae", *autoencoder_export(space))

    make_out_dir(out, "unet", "scheduler", *([vae[0]] if vae else []))
    write_model(out / "unet", dcfg, state)
    if run.class_cond and run.null_class is not None:  # names and null label, for a round trip
        atomic_write_json(out / "unet" / CLASSES_FILE, {"names": list(run.class_names), "null": run.null_class},
                          error=CheckpointError)
    atomic_write_json(out / "scheduler" / SCHEDULER_FILE, scfg, error=CheckpointError)
    index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", scfg["_class_name"]],
             "unet": ["diffusers", "UNet2DModel"]}
    if vae is not None:
        write_model(out / vae[0], vae[1], vae[2])
        index[vae[0]] = ["diffusers", VAE_CLASS]
    if vae is not None and vae[0] == "vqvae":
        index["_class_name"] = LDM_PIPELINE
        atomic_write_json(out / "model_index.json", index, error=CheckpointError)
        steps = min(LDM_STEPS, int(diffusion["T"]))
        log(f"exported {run_dir} to {out}: an LDMPipeline (vqvae/ an AutoencoderKL with scaling_factor "
            f"{vae[1]['scaling_factor']:.6g}, a {scfg['_class_name']}); in Python: from diffusers import LDMPipeline; "
            f"pipe = LDMPipeline.from_pretrained({str(out)!r}); images = pipe(batch_size=4, "
            f"num_inference_steps={steps}).images")
        return out
    if not run.class_cond and vae is None and precond is None:
        atomic_write_json(out / "model_index.json", index, error=CheckpointError)
        log(f"exported {run_dir} to {out}: DDPMPipeline.from_pretrained({str(out)!r}) loads it")
        return out
    source = Path(__file__).with_name("diffusers_pipeline.py").read_text(encoding="utf-8")
    atomic_write_text(out / PIPELINE_FILE, source, error=CheckpointError)
    # diffusers' convention for a pipeline whose code sits in its folder: _class_name = [module, class]
    cls = (PIPELINE_CLASS if run.class_cond else LATENT_PIPELINE_CLASS if space is not None else
           UNCONDITIONAL_PIPELINE_CLASS)
    index["_class_name"] = [Path(PIPELINE_FILE).stem, cls]
    if run.class_cond:
        index["null_class"] = run.null_class
    if space is not None:  # the exact map, one number or one per channel: images = vae.decode(z / scale + shift)
        map_ = space.section()
        index.update(latent_scale=map_["scale"], latent_shift=map_["shift"])
    if precond is not None:
        index[PRECOND_KEY] = precond
    atomic_write_json(out / "model_index.json", index, error=CheckpointError)
    load = (f"from diffusers import DiffusionPipeline; pipe = DiffusionPipeline.from_pretrained({str(out)!r}, "
            "trust_remote_code=True)")
    decoded = "" if space is None else ", decoded by its vae/"
    edm = "" if precond is None else f", EDM's preconditioning with sigma_data {precond:g}"
    if not run.class_cond:
        why = ("the run was trained with EDM's preconditioning, which only this pipeline applies"
               if precond is not None else "the run's latent map has a per-channel scale or a shift, and "
               "LDMPipeline only divides by one scaling_factor")
        log(f"exported {run_dir} to {out}: a {cls} ({out / PIPELINE_FILE}{edm}{decoded}), not "
            f"{'a DDPMPipeline' if space is None else 'an LDMPipeline'}: {why}; in Python: {load}; "
            "images = pipe(batch_size=4).images")
        return out
    from ..diffusion.denoiser import DEFAULT_GUIDANCE

    n = model.config["num_class_embeds"] - (run.null_class is not None)  # the labels of real classes
    labels = [0, n - 1] if n > 1 else [0]
    # without a null class it cannot be guided; a distilled student draws guided by itself
    w = DEFAULT_GUIDANCE if run.null_class is not None and run.distilled is None else 0.0
    log(f"exported {run_dir} to {out}: a class-conditional {PIPELINE_CLASS} ({out / PIPELINE_FILE}, labels "
        f"0..{n - 1}, guidance weight w as ddpmkit's, diffusers' guidance_scale = 1 + w{edm}{decoded}); in Python: "
        f"{load}; images = pipe(class_labels={labels}, guidance={w:g}).images")
    return out


def _ldm_can_apply(space: LatentSpace) -> bool:
    """Whether LDMPipeline's ``vqvae.decode(z / scaling_factor)`` is the run's map: one scale, no shift."""
    return len(set(space.scale.tolist())) == 1 and not space.shift.any()


def _ddim_scheduler(scfg: dict) -> dict:
    """The DDIMScheduler config of an exported DDPMScheduler config: the same schedule and prediction; the last
    step to alpha_bar = 1 and no offset, as ddpmkit's DDIM."""
    cfg = {k: v for k, v in scfg.items() if k != "variance_type"}
    cfg.update(_class_name="DDIMScheduler", set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    return cfg
