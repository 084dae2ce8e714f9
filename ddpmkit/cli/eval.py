"""`ddpmkit eval`: bits/dim (nll), FID (fid), Gamma_t of the analytic variance (variance), memorization."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import CLIError, add_class_flags, add_sampler_flags, check_counts, sample_options, samplers_epilog


def add_parser(sub) -> None:
    """Register `eval` and its flags."""
    e = sub.add_parser("eval", help="measure a run: bits/dim (nll), FID (fid), Gamma_t of the analytic variance "
                                    "(variance), copying of training images (memorization)",
                       description="`eval nll RUN_DIR`: the variational bound (DDPM eq. 5) in bits/dim, term by "
                                   "term as in the official DDPM code; on a latent run, in bits per latent "
                                   "dimension of the encoded, scaled latents with a continuous Gaussian L_0 (not "
                                   "comparable with pixel bits/dim). `eval fid RUN_DIR`: the Frechet distance of "
                                   "samples to a reference set, with Inception features or, offline for the "
                                   "digits, the features of a small digits classifier. `eval variance RUN_DIR`: "
                                   "Gamma_t = E||eps_theta(x_t, t)||^2 / d for every t on --n training images "
                                   "(default 256; a latent run's are encoded first), stored in the run for "
                                   "--variance analytic (Analytic-DPM). "
                                   "`eval memorization RUN_DIR`: the distance of --n samples (default 500; "
                                   "--sampler, --steps, default DDIM 50) to their nearest training images, in "
                                   "pixels and features, against real images' own; writes eval/memorization.*",
                       epilog=samplers_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("what", choices=["nll", "fid", "variance", "memorization"])
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--n", type=int, default=None, help="images: nll 256, fid 50000 samples, memorization 500 "
                                                            "samples (default)")
    e.add_argument("--batch-size", type=int, default=None, help="images per batch (default: nll 16, fid 64)")
    e.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default: on)")
    e.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g = e.add_argument_group("nll")
    g.add_argument("--data", default=None, help="data source (default: the run's own)")
    g.add_argument("--split", default="test", help="train or test; digits and folders have only train "
                                                  "(default: test)")
    g.add_argument("--out", default=None, metavar="DIR", help="where the per-term CSV and plot go "
                                                             "(default: RUN_DIR/eval)")
    f = e.add_argument_group("fid")
    f.add_argument("--features", default="inception", choices=["inception", "digits"],
                   help="Inception pool features, or the digits classifier's (default: inception)")
    f.add_argument("--reference", default=None, help="reference images: cifar10-train (default for inception), "
                                                     "cifar10-test, digits, or a data source")
    f.add_argument("--data-dir", default=None, metavar="DIR", help="folder with CIFAR-10 for the reference")
    f.add_argument("--inception", default=None, metavar="PATH",
                   help="inception-2015-12-05.pt (default: in the cache folder)")
    f.add_argument("--download", action="store_true", help="download the Inception network when it is absent")
    add_sampler_flags(f, variance=False)
    f.add_argument("--protocol", default=None, choices=["ddpm-paper"],
                   help="ddpm-paper: exactly the DDPM paper's CIFAR-10 FID (1000 ancestral steps, large variance, "
                        "EMA, 50,000 samples against the CIFAR-10 train set, Inception features); the FID line "
                        "always names the protocol (default: custom, from the flags)")
    e.set_defaults(sampler=None)  # ddim unless --protocol says otherwise (_eval_fid)
    add_class_flags(f, class_help="class-conditional runs. fid: the class of the samples, and of the reference "
                                   "images when they have labels: 7, 3,5,8 or all (default: every class in turn). "
                                   "nll: the label of every image, one class or none (the null class: the model as "
                                   "an unconditional one) (default: each image's true label)",
                     guidance_help="(default: fid and memorization {w:g} for a class-conditional run; nll 0, "
                                   "the conditional model's bound: w > 0 gives the bound of DDPM's guided ancestral "
                                   "chain)")
    e.add_argument("--variance", default=None, metavar="NAME",
                   help="small, large, learned (a --learn-sigma run) or analytic (after `eval variance`): the "
                        "bound's variance, or the sampler's for fid (default: the run's own, its `variance` setting)")
    e.set_defaults(func=run)


def run(args) -> int:
    """Measure the run: nll here, fid, variance and memorization below."""
    from ..run import Run

    args.opened = Run.open(args.run_dir)  # a one-line error before any work when it is not a run; opened once
    if args.what == "fid":
        return _eval_fid(args)
    if args.what == "memorization":
        return _eval_memorization(args)
    if args.what == "variance":
        return _eval_variance(args)
    from ..metrics.nll import evaluate_nll, write_terms_csv
    from ..viz import plot_bpd_terms

    args.n = 256 if args.n is None else args.n
    args.batch_size = 16 if args.batch_size is None else args.batch_size
    check_counts(args.n, args.batch_size)
    from ..diffusion import VARIANCES

    if args.variance not in (None, *VARIANCES):
        raise CLIError(f"unknown variance {args.variance!r}: choose one of {', '.join(VARIANCES)}")
    res = evaluate_nll(args.opened, data=args.data, split=args.split, n=args.n, batch_size=args.batch_size,
                       ema=args.ema, variance=args.variance, seed=args.seed, classes=args.classes,
                       guidance=args.guidance)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    if res.get("note"):
        print(f"note: {res['note']}", file=sys.stderr)
    import json

    from ..files import atomic_write_text

    name = f"nll_terms{res['tag']}"  # -classnone, -class3, -w0.5: each conditioning keeps its own files
    latent = res.get("space") == "latent"
    keys = ("bpd", "bpd_stderr", "n", "source", "split", "variance", "objective", "ema", "T", "conditioning",
            "guidance", "seed", "note")
    unit, encoded, title = "bits/dim", "", None
    if latent:  # the bound of the scaled latents: its own unit, named in every file and line (metrics/nll.py)
        keys += ("space", "unit", "space_note", "decoder", "latent_shape", "unscaled")
        unit = f"{res['unit']} (a bound on the density of the scaled latents, not comparable with pixel bits/dim)"
        encoded = f" encoded into {'x'.join(map(str, res['latent_shape']))} latents"
        terms = res["terms"]
        title = (f"latent variational bound by timestep: {sum(terms):.3f} bits per latent dim in all\n"
                 f"L_0 (continuous Gaussian) {terms[0]:.3f}, prior L_T {terms[-1]:.2g}")
    csv_path = write_terms_csv(out / f"{name}.csv", res["terms"], column="bits_per_latent_dim" if latent else "bits")
    png = plot_bpd_terms(res["terms"], out / f"{name}.png", title=title)
    notes = atomic_write_text(out / f"{name}.json", json.dumps({k: res.get(k) for k in keys}, indent=2) + "\n")
    cond = f", conditioned on {res['conditioning']}" if res["conditioning"] else ""
    print(f"NLL bound: {res['bpd']:.4f} +- {res['bpd_stderr']:.4f} {unit} on {res['n']} images of "
          f"{res['source']} ({res['split']}){encoded}{cond}, variance {res['variance']}, "
          f"{'EMA' if res['ema'] else 'raw'} weights, {res['seconds']:.1f} s")
    if latent:
        u = res["unscaled"]
        print(f"  not a likelihood of the images: the autoencoder's reconstruction term and the log-determinant of "
              f"the scale are not in it, and it can be negative (a density, not a probability); on the unscaled "
              f"posterior means: {u['nats']:.2f} nats per latent ({u['nats_per_dim']:.4f} per dim, "
              f"log-determinant {u['log_det_nats']:+.2f} nats)")
    print(f"terms: {csv_path} (notes: {notes.name})")
    print(f"plot:  {png}")
    return 0


def _eval_variance(args) -> int:
    """`eval variance RUN`: Gamma_t of the analytic variance (Analytic-DPM), stored in the run."""
    import time

    from ..gamma import estimate_run_gamma

    n = 256 if args.n is None else args.n
    batch_size = 32 if args.batch_size is None else args.batch_size
    check_counts(n, batch_size)
    run = args.opened
    start = time.perf_counter()
    gamma, note = estimate_run_gamma(run, n=n, batch_size=batch_size, seed=args.seed, ema=args.ema, data=args.data)
    path = run.save_gamma(gamma, note)
    where = " (encoded into the run's latents)" if note.get("space") == "latent" else ""
    print(f"Gamma_t over {note['n']} images of {note['source']}{where} (checkpoint step {note['step']}, "
          f"{'EMA' if args.ema else 'raw'} weights): min {float(gamma.min()):.4f}, max {float(gamma.max()):.4f}, "
          f"{time.perf_counter() - start:.1f} s")
    print(f"stored: {path} (use it with --variance analytic)")
    return 0


def _eval_memorization(args) -> int:
    """`eval memorization RUN`: each sample's nearest training image, against real images' own (issue 19)."""
    from ..metrics.memorization import evaluate_memorization
    from ..samplers import SAMPLERS, sampler_names

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise CLIError(f"unknown --sampler {args.sampler!r}: choose one of {', '.join(sampler_names())}")
    res = evaluate_memorization(args.opened, n=500 if args.n is None else args.n, sampler=args.sampler,
                                steps=args.steps, seed=args.seed, out=args.out, ema=args.ema,
                                guidance=getattr(args, "guidance", None), log=lambda m: print(m, file=sys.stderr))
    print(f"memorisation check: {res['n']} samples ({res['sampler']}, {res['steps']} steps) against the "
          f"{res['n_train']} training images, "
          f"{res['seconds']:.1f} s")
    for key, name in (("pixels", "pixels"), ("features", res.get("features", {}).get("name"))):
        r = res.get(key)
        if r is None:
            continue
        print(f"  {name}: nearest training image at {r['samples_median']:.4g} (median; real images "
              f"{r['real_median']:.4g}); samples closer than real images: {r['closer_than_real']:.3f} "
              f"(0.5 = alike, 1 = copies); near copies {100 * r['near_copies']:.1f}% (real "
              f"{100 * r['real_near_copies']:.1f}%, below {r['threshold']:.4g})")
    print(f"result: {res['json']}")
    if res.get("figure"):
        print(f"pairs:  {res['figure']}")
    return 0


def _eval_fid(args) -> int:
    """`eval fid RUN`: the Frechet distance of samples to a reference set, the protocol named beside it."""
    from ..metrics.fid import evaluate_fid
    from ..samplers import get_sampler

    n = 50_000 if args.n is None else args.n
    check_counts(n, args.batch_size, n_min=2)  # a covariance needs two samples
    if args.sampler is None:  # left unset (so that --protocol can tell): ddim, or the protocol's
        args.sampler = "ddpm" if args.protocol == "ddpm-paper" else "ddim"
    opt = sample_options(args, ema=args.ema)
    res = evaluate_fid(args.opened, n=n, reference=args.reference, data_dir=args.data_dir, features=args.features,
                       inception_path=args.inception, download=args.download, sample_options=opt,
                       batch_size=args.batch_size, seed=args.seed, protocol=args.protocol)
    opts = "".join(f", {k} {v:g}" if isinstance(v, float) else f", {k} {v}" for k, v in res["options"].items())
    reads = get_sampler(res["sampler"]).reads_variance(res["options"], res["variance"])
    variance = f", {res['variance']} variance" if reads else ""
    sampler = f"{res['sampler']}{variance}, {res['steps']} steps{opts}, {res['spacing']} spacing"
    if res.get("guidance") is not None:
        sampler += f", guidance w = {res['guidance']:g}"
        if res.get("classes") is not None:
            sampler += f", class {','.join(res['class_names'])}"
    # the protocol beside every FID: the DDPM paper's exactly, or custom and how it differs from it
    protocol = res["protocol"] + ("" if not res["protocol_differences"] else
                                  f", not ddpm-paper: {'; '.join(res['protocol_differences'])}")
    print(f"FID ({res['features']} features, protocol {protocol}): {res['fid']:.3f} for {res['n']} samples "
          f"({sampler}) against "
          f"{res['n_reference']} images of {res['reference']}; sampling {res['sample_seconds']:.1f} s, "
          f"scoring {res['score_seconds']:.1f} s")
    if "noise_floor" in res:
        floor = f"{res['noise_floor']:.3f} ({res['noise_floor_n']} held-out real digits)"
        if "noise_floor_at_n" in res:
            floor += f", {res['noise_floor_at_n']:.3f} at n = {res['n']}"
        print(f"noise floor, real against real: {floor}")
    return 0
