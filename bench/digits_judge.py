"""An independent judge of generated digits: a small CNN trained on the real digits, never on samples.

The classifier itself (network, training, cache, features) lives in ``ddpmkit.metrics.digits``, the rows of its
table in ``bench/digits_tools.py``; this script is the table and its command line.

The classifier is trained on the 1,797 scikit-learn digits at 16x16 (``load_dataset("digits")``,
scaled to [-1, 1] as ddpmkit scales them), with random shifts of up to 2 pixels as augmentation. A
stratified 20% of the digits (359) is held out to measure its accuracy (about 99%). Its weights are cached as
safetensors under ``$DDPMKIT_CACHE`` (or ``~/.cache/ddpmkit``) in ``judge-<key>.safetensors``, where the
key hashes the classifier's version, its training code, its settings (seed, epochs) and the digits themselves,
so that a second run loads it instantly and a change to any of these trains a new one.

For a set of images (uint8 [N, 1, 16, 16], or a folder of PNG files) it reports

* ``confidence`` - the mean of the largest softmax probability (how sure the classifier is that each is a digit);
* ``coverage``   - how many of the 10 classes receive at least a third of their fair share (N / 10 / 3)
  of the predictions, and ``entropy``, the entropy of the predicted-class histogram divided by log(10)
  (1.0 = every class equally often);
* ``fd``         - the Frechet distance between Gaussians fitted to the classifier's penultimate features
  (64 after a ReLU) of the set and of the reference: like FID, with this classifier in place of InceptionV3
  ("FDD"). The reference is the classifier's *training split* (1,438 real digits), so that the held-out
  split (359 real digits) measured against it gives an honest floor. A Frechet distance estimated from
  N samples is biased upwards by roughly 1/N (with 64 features, the floor is about 7 at N = 359 but
  about 80 at N = 64); compare sets of equal size, and read a set of N samples against the "real, n=N"
  row (a seeded random N of the held-out digits), which the CLI adds for every N below 359 it sees.

A classifier can be fairly confident on noise (noise lands in a few classes, each with a softmax far
from uniform), so confidence alone does not tell digits from noise; the coverage and above all the FD do,
which is why the table has noise rows.

    python bench/digits_judge.py DIR [DIR ...] [--seed 0] [--epochs 20] [--no-cache] [--json PATH]

prints the classifier's held-out accuracy and a table: the reference rows (real held-out digits, real digits
at each N seen, Gaussian noise, uniform noise), then one row per folder. The first run trains the classifier
(20 epochs of a 50k-parameter CNN on one CPU thread, about 25-50 s), later runs load it from the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_tools import DigitsRow, evaluate, load_png_dir, reference_rows  # noqa: E402

from ddpmkit.errors import DdpmkitError  # noqa: E402
from ddpmkit.metrics.digits import DEFAULT_EPOCHS, DEFAULT_SEED, DigitsClassifier  # noqa: E402

__all__ = ["describe_classifier", "format_table", "judge_dirs", "main"]


# --------------------------------------------------------------------------------------------------
# The table


def format_table(rows: list[DigitsRow]) -> str:
    w = max([len("source")] + [len(r.source) for r in rows])
    lines = [f"{'source':<{w}}  {'N':>5}  {'confidence':>10}  {'coverage':>8}  {'entropy':>7}  {'FD':>9}"]
    for r in rows:
        lines.append(f"{r.source:<{w}}  {r.n:>5}  {r.confidence:>10.3f}  {f'{r.coverage}/10':>8}  "
                     f"{r.entropy:>7.3f}  {r.fd:>9.3f}")
    return "\n".join(lines)


def judge_dirs(dirs, *, classifier: DigitsClassifier | None = None, seed: int = DEFAULT_SEED,
               epochs: int = DEFAULT_EPOCHS, cache_dir=None, use_cache: bool = True, log=print, labels=None,
               pattern: str | None = None) -> tuple[DigitsClassifier, list[DigitsRow]]:
    """Judge each folder of PNGs (see ``load_png_dir``); return the classifier and the rows (reference rows
    first)."""
    sets = [(labels[i] if labels else str(d), load_png_dir(d, pattern=pattern)) for i, d in enumerate(dirs)]
    if classifier is None:
        classifier = DigitsClassifier.load_or_train(seed=seed, epochs=epochs, cache_dir=cache_dir,
                                                    use_cache=use_cache, log=log)
    describe_classifier(classifier, log)
    rows = reference_rows(classifier, ns=[x.shape[0] for _, x in sets])
    rows += [evaluate(classifier, x, name) for name, x in sets]
    return classifier, rows


def describe_classifier(clf: DigitsClassifier, log=print) -> None:
    how = "loaded from the cache" if clf.from_cache else f"trained in {clf.train_seconds:.1f} s"
    log(f"digits classifier: {how} (seed {clf.seed}, {clf.epochs} epochs, key {clf.key}); held-out accuracy "
        f"{clf.test_accuracy:.4f} on {len(clf.test_idx)} digits; FD reference: the "
        f"{len(clf.train_idx)} real digits of its training split")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description="Judge folders of generated 16x16 digits with a CNN trained on "
                                            "the real digits: confidence, class coverage, Frechet distance.")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="folders of 16x16 PNG samples")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the classifier (split, init, batches)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs of the classifier")
    p.add_argument("--cache-dir", default=None, help="where the classifier's weights are cached "
                                                     "(default $DDPMKIT_CACHE or ~/.cache/ddpmkit)")
    p.add_argument("--no-cache", action="store_true", help="train afresh and do not write the cache")
    p.add_argument("--pattern", default=None, help="which files of each DIR to judge (default: sample_*.png "
                                                   "if there are any, else *.png)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error("--epochs must be at least 1")
    try:  # the table goes to stdout, everything else to stderr
        clf, rows = judge_dirs(a.dirs, seed=a.seed, epochs=a.epochs, cache_dir=a.cache_dir,
                               use_cache=not a.no_cache, log=lambda m: print(m, file=sys.stderr),
                               pattern=a.pattern)
    except DdpmkitError as e:  # a bad folder or image (DigitsError), an unwritable cache, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"judge": {"seed": clf.seed, "epochs": clf.epochs,
                                                      "key": clf.key, "test_accuracy": clf.test_accuracy},
                                            "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
