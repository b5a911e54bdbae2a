"""Take docs/serve-page.png: `dogtl serve`'s page in headless Chromium, after classifying a digit.

The model is bench_serve's (the real pretrained MobileNetV2 backbone + a head trained on
scikit-learn's digits). Needs ../shared/weights, the serve extra, selenium, chromium and
chromium-driver.

    python docs/make_screenshot.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))


def main():
    from bench_serve import WEIGHTS, build_model

    from dogtl.serving.app import create_app
    from dogtl.serving.browser import classify_in_page, headless_chromium
    from dogtl.serving.model import load_serving_model
    from dogtl.serving.server import ServerThread

    root = Path(tempfile.mkdtemp(prefix="dogtl-shot-"))
    model, files = build_model(root, WEIGHTS)
    with ServerThread(create_app(load_serving_model(model))) as server:
        driver = headless_chromium(1000, 620)
        try:
            shown = classify_in_page(driver, server.url, files[7 * 30 + 3])  # a 7
            driver.save_screenshot(str(HERE / "serve-page.png"))
        finally:
            driver.quit()
    print(f"top classes shown: {shown}; wrote {HERE / 'serve-page.png'}")


if __name__ == "__main__":
    main()
