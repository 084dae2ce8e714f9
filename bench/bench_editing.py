"""Inpainting real digits whose bottom half is hidden: does RePaint give back the right digit?

    python bench/bench_editing.py RUN_DIR                          # 500 digits, S = 100, J = 10, R = 10 and R = 1
    python bench/bench_editing.py RUN_DIR --n 200 --steps 250 --resample 10,5,1

The first N digits of a seeded permutation of the 1,797 real digits have their bottom half masked
(``--mask bottom-half``) and are inpainted once each with RePaint on the run's model. The digits classifier
(``ddpmkit.metrics.digits``, about 99% accurate on held-out real digits) is asked for each image's label; the table
gives the fraction it assigns to the original label for the unmasked originals, for the masked inputs alone (the
hidden half black, the model's background) and for each R, with the Frechet distance of each set's classifier
features to the real digits (lower is closer; compare equal N). Torch runs on one thread.
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

import torch  # noqa: E402

from ddpmkit.edit import make_mask, masked_view, repaint, repaint_model_calls  # noqa: E402
from ddpmkit.images import from_uint8, to_uint8  # noqa: E402
from ddpmkit.metrics.digits import DigitsClassifier, real_digits  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.samplers import PerSampleNoise  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=500, help="digits to inpaint (default: 500)")
    p.add_argument("--steps", type=int, default=100, help="respaced DDPM steps S (default: 100)")
    p.add_argument("--jump", type=int, default=10, help="J (default: 10)")
    p.add_argument("--resample", default="10,1", help="the R values to compare (default: 10,1)")
    p.add_argument("--mask", default="bottom-half")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    run = Run.open(args.run_dir)
    C, H, W = run.image_shape
    den = run.denoiser()
    den.net.to(memory_format=torch.channels_last)
    clf = DigitsClassifier.load_or_train()
    images, labels = real_digits()
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.n]
    x_u8, y = images[pick], labels[pick].numpy()
    x0 = from_uint8(x_u8)
    known = make_mask(args.mask, (H, W), seed=args.seed)
    # the masked input alone: the hidden pixels set to -1, the digits' black background
    masked_u8 = to_uint8(masked_view(x0, known, fill=-1.0))

    rows = [("original digits", x_u8, None, "-"), ("masked inputs alone", masked_u8, None, "-")]
    for R in [int(r) for r in args.resample.split(",")]:
        t0 = time.perf_counter()
        out = []
        for start in range(0, args.n, args.batch_size):
            out.append(repaint(den, x0[start:start + args.batch_size], known, steps=args.steps, jump=args.jump,
                               resample=R, noise=PerSampleNoise(args.seed, start)))
        secs = time.perf_counter() - t0
        rows.append((f"RePaint S={args.steps} J={args.jump} R={R}", to_uint8(torch.cat(out)), secs,
                     repaint_model_calls(args.steps, args.jump, R)))
        print(f"R={R}: {secs:.0f} s", file=sys.stderr, flush=True)

    print(f"{args.n} real digits, {args.mask} masked, run {args.run_dir}; classifier held-out accuracy "
          f"{clf.test_accuracy:.3f}\n")
    print("| images | classified as the original label | Frechet distance | network calls per image | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for name, u8, secs, calls in rows:
        acc = float((clf.predict(u8) == y).mean())
        fd = clf.fd(u8)
        print(f"| {name} | {acc:.3f} | {fd:.1f} | {calls} | {'' if secs is None else f'{secs:.0f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
