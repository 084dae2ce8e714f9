"""`ddpmkit inpaint` (RePaint) and `ddpmkit edit` (SDEdit): a trained run applied to given images."""

from __future__ import annotations

import argparse

from .common import add_class_flags, add_sampler_flags, sample_options, samplers_epilog


def add_parser(sub) -> None:
    """Register `inpaint` and `edit` and their flags."""
    ip = sub.add_parser("inpaint", help="fill in the masked part of an image with a trained run (RePaint)",
                        description="RePaint (Lugmayr et al. 2022): at each reverse step the known pixels are "
                                    "re-noised from the image and the unknown ones come from the model; every "
                                    "--jump steps the chain goes back up and down again, --resample times. "
                                    "Writes each result as a PNG and one figure: original, masked, results. "
                                    "On a latent run the mask is reduced to the latent grid (a cell is known "
                                    "when all its pixels are), the latents are inpainted, and the known pixels "
                                    "are pasted back over the decoding: exact there, with the decoder's seam at "
                                    "the mask's edge.")
    add_edit_inputs(ip)
    ip.add_argument("--mask", required=True, metavar="MASK",
                    help="a grayscale PNG, white where the image is known, or a shortcut naming the missing part: "
                         "bottom-half, top-half, left-half, right-half, center, random:P (a fraction P missing)")
    ip.add_argument("--jump", type=int, default=10, help="J: go back up J steps at a time (default: 10)")
    ip.add_argument("--resample", type=int, default=10, help="R: pass each stretch R times; 1 is no resampling "
                                                            "(default: 10)")
    ip.add_argument("--steps", type=int, default=None, help="timesteps of the respaced DDPM process, 1..T "
                                                            "(default: 250, the paper's, or T when smaller)")
    ip.add_argument("--timesteps", "--spacing", dest="spacing", default="uniform", metavar="NAME",
                    help="which timesteps (default: uniform)")
    ip.add_argument("--variance", default=None, metavar="NAME",
                    help="reverse-process variance: small or large (default: the run's own)")
    ip.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                    help="clip the predicted x0 to [-1, 1] (default: on)")
    ip.add_argument("--n", type=int, default=8, help="results per image (default: 8)")
    ip.set_defaults(func=run_inpaint)

    ed = sub.add_parser("edit", help="turn an image into a plausible one of the run's kind (SDEdit)",
                        description="SDEdit (Meng et al. 2022): noise the image to t0 = strength x T, then run any "
                                    "sampler from t0. Strength 0 returns the image, 1 is plain sampling. Writes "
                                    "each result as a PNG and one strip: the input, then each strength. On a "
                                    "latent run the image is encoded, its latents edited and decoded (strength 0 "
                                    "then gives the autoencoder's reconstruction).",
                        epilog=samplers_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_edit_inputs(ed)
    ed.add_argument("--strength", default="0.5", metavar="S[,S...]",
                    help="how much to change, in [0, 1]; several, comma-separated, make the strip (default: 0.5)")
    add_sampler_flags(ed)
    ed.add_argument("--n", type=int, default=4, help="results per image and strength (default: 4)")
    ed.set_defaults(func=run_edit)


def add_edit_inputs(p) -> None:
    """RUN_DIR, --image and the flags inpaint and edit share."""
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--image", required=True, metavar="IMG",
                   help="an image file of the model's size and channels (grayscale or RGB), or digits:I[,J,...], "
                        "real digits by index")
    p.add_argument("--resize", action="store_true", help="resize an image or mask of another size to the model's")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory (default: the run's latest intact one)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default: on)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/edits/<settings>)")
    p.add_argument("--device", default=None, help="device (default: cpu)")
    add_class_flags(p, class_help="class-conditional runs: the class of every input image, by label or name (7), "
                                   "or none: the null class, the model as an unconditional one (default: the "
                                   "image's own label, digits:I of a digits run, else none)",
                     guidance_help="(default: {w:g} with a class, refused with none)")


def run_inpaint(args) -> int:
    """Inpaint and print where the results went."""
    from ..edit.commands import inpaint_run

    res = inpaint_run(args.checkpoint or args.run_dir, image=args.image, mask=args.mask, out=args.out,
                      jump=args.jump, resample=args.resample, n=args.n, steps=args.steps, spacing=args.spacing,
                      variance=args.variance, clip_x0=args.clip, seed=args.seed, batch_size=args.batch_size,
                      ema=args.ema, device=args.device, resize=args.resize, classes=args.classes,
                      guidance=args.guidance)
    cond = f"; conditioned on {res['conditioning']}" if res["conditioning"] else ""
    print(f"{res['n']} inpaintings in {res['seconds']:.1f} s (RePaint, {res['steps']} steps, jump "
          f"{args.jump}, resample {args.resample}: {res['model_calls']} network calls per image{cond})")
    if res["note"]:
        print(res["note"])
    print(f"images: {res['dir']}")
    print(f"figure: {res['figure']}")
    return 0


def run_edit(args) -> int:
    """Edit and print where the results went."""
    from ..edit.commands import edit_run, parse_strengths

    strengths = parse_strengths(args.strength)
    opt = sample_options(args, n=args.n, batch_size=args.batch_size, seed=args.seed, ema=args.ema)
    res = edit_run(args.checkpoint or args.run_dir, image=args.image, strengths=strengths, sample_options=opt,
                   out=args.out, device=args.device, resize=args.resize)
    calls = ", ".join(f"{c} at {s:g}" for s, c in zip(res["strengths"], res["model_calls"]))
    cond = f"; conditioned on {res['conditioning']}" if res["conditioning"] else ""
    print(f"{res['n']} edits in {res['seconds']:.1f} s (SDEdit with {res['plan'].sampler}; network calls per "
          f"image: {calls}{cond})")
    if res["note"]:
        print(res["note"])
    print(f"images: {res['dir']}")
    print(f"strip:  {res['figure']}")
    return 0
