"""Does extracting at a reduced precision change what a head learns? (issue 13)

On real images (sklearn's digits, upscaled to 96 px) through the real pretrained backbone
(../shared/weights/mobilenet_v2_stanford_dogs.weights.h5, --backbone mobilenet_v2), one cache
per precision (float32, bfloat16: same split, same augmented passes), then train-head on each
with a few seeds; prints the validation log loss and accuracy per seed side by side, and the
features' cosine similarity to float32's. Target: the same scores within the seed-to-seed noise.
On a CPU without hardware bfloat16 the bfloat16 extraction is emulated (slow but exact).

    python benchmarks/precision_quality.py                 # 40 digits per class, 3 seeds
    python benchmarks/precision_quality.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.seeds, args.passes = 12, 2, 1
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_finetune import WEIGHTS, digits_folder

    from dogtl import api
    from dogtl.features.cache import open_cache

    if not WEIGHTS.exists():
        sys.exit(f"needs the pretrained backbone at {WEIGHTS}")
    results, features = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = digits_folder(tmp / "data", args.per_class, 96)
        for precision in args.precisions:
            cache = tmp / f"{precision}.h5"
            api.extract_features(data, cache, progress=False, backbone="mobilenet_v2", weights=str(WEIGHTS),
                                 image_size=96, passes=args.passes, batch_size=32, dtype="float32",
                                 precision=precision, val_fraction=0.25)
            c = open_cache(cache)
            features[precision] = c.features("labelled")
            results[precision] = []
            for seed in range(args.seeds):
                r = api.train_head(cache, tmp / f"head-{precision}-{seed}.keras", progress=False, epochs=20, seed=seed)
                results[precision].append((r.metrics["val_log_loss"], r.metrics["val_accuracy"]))
            print(f"  {precision}: recorded precision {c.fingerprint['precision']}", flush=True)
    ref = features["float32"].reshape(-1, features["float32"].shape[-1]).astype(np.float64)
    print(f"train-head (20 epochs) on digits ({args.per_class} per class, 25% validation, 1 clean + {args.passes} "
          f"augmented passes) through the pretrained mobilenet_v2 at 96 px, {args.seeds} seeds")
    for precision, runs in results.items():
        f = features[precision].reshape(ref.shape).astype(np.float64)
        cos = np.sum(f * ref, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)
        losses = [r[0] for r in runs]
        print(f"  {precision:9s} val log loss " + " ".join(f"{v:.4f}" for v in losses)
              + f"  mean {statistics.mean(losses):.4f}" + (f" sd {statistics.stdev(losses):.4f}" if len(losses) > 1 else "")
              + "  accuracy " + " ".join(f"{r[1]:.3f}" for r in runs) + f"  feature cosine to float32 min {cos.min():.6f}")
    for precision in results:
        if precision != "float32":
            d = [a[0] - b[0] for a, b in zip(results[precision], results["float32"])]
            print(f"  {precision} - float32 log loss per seed: " + " ".join(f"{x:+.4f}" for x in d))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
