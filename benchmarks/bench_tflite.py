"""What does each `dogtl export --format tflite --quantize` cost in agreement with the Keras model?

bench_serve's model (the real pretrained MobileNetV2 backbone at 160 px + a head trained on
scikit-learn's digits, upscaled) is converted with --quantize none, float16 and dynamic; each
file is checked, as `dogtl export` does, on held-out digits (not in the head's training set):
size, top-1 agreement with the Keras model, largest probability difference, side by side:
against the Keras model on dogtl's float pixels (what `dogtl predict` gives) and on the same
uint8 pixels the TFLite file gets (what conversion and quantization alone change).

    python benchmarks/bench_tflite.py        # ~3 min on 2 cores
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from bench_serve import WEIGHTS, build_model
    from dogtl.serving.export import QUANTIZE, check_tflite, export_tflite
    from dogtl.serving.model import load_serving_model

    root = Path(tempfile.mkdtemp(prefix="bench-tflite-"))
    model, _ = build_model(root, WEIGHTS)
    digits = load_digits()
    held_out = []
    for c in range(10):
        for k in np.flatnonzero(digits.target == c)[30:50]:  # build_model trains on the first 30
            path = root / f"val{k}.png"
            pixels = (255 - digits.images[k] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").resize((96, 96), Image.BICUBIC).save(path)
            held_out.append(path)
    sm = load_serving_model(model)
    print(f"{len(held_out)} held-out digit images; Keras model: mobilenet_v2 at 160 px + digits head")
    print(f"{'':>16} {'vs Keras, dogtl pixels':>26} | {'vs Keras, same uint8 pixels':>27}")
    print(f"{'quantize':>9} {'MB':>6} {'top-1 agreement':>16} {'max |dp|':>9} | {'top-1 agreement':>16} {'max |dp|':>10}")
    for quantize in QUANTIZE:
        path = export_tflite(sm, root / f"digits_{quantize}.tflite", quantize=quantize)
        c = check_tflite(path, sm, held_out)
        print(f"{quantize:>9} {path.stat().st_size / 1e6:6.1f} {c.top1_agreement:16.1%} {c.max_abs_diff:9.4f} | "
              f"{c.top1_same_pixels:16.1%} {c.max_abs_diff_same_pixels:10.4f}")


if __name__ == "__main__":
    main()
