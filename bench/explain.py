"""What an explanation costs: `Explainer.heatmaps` against scoring the same images.

    .venv/bin/python bench/explain.py [--size 224] [--n 16] [--repeats 3] [--json OUT]

For ResNet50V2 (Grad-CAM: a forward pass to the last block, then the head forward and
backward) and the ViT (attention rollout: a forward pass to every block's input, then
each block's attention recomputed) at `--size` with random weights, one image at a time
as `?explain=true` asks: seconds per image for the heatmap and for the Keras forward
pass that scores it (the plain baseline), best of `--repeats`, and their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _measure import save_json


def best_per_image(call, images: np.ndarray, repeats: int) -> float:
    call(images[:1])  # trace / warm up
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for image in images:
            call(image[None])
        runs.append((time.perf_counter() - started) / len(images))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/results/explain.json")
    args = parser.parse_args()

    from detector.model.architectures import build_model, get_spec
    from detector.model.explain import Explainer
    from detector.model.runtimes import keras_forward

    images = np.random.default_rng(0).integers(0, 256, (args.n, args.size, args.size, 3),
                                               dtype=np.uint8)
    results = {}
    for name in ("resnet50v2", "vit"):
        overrides = {"weights": "none"} if get_spec(name).pretrained else {}
        model = build_model(name, image_size=args.size, **overrides)
        explainer = Explainer(model, get_spec(name).family)
        forward = keras_forward(model, args.size)
        score_s = best_per_image(lambda x, f=forward: f(x.astype(np.float32)), images,
                                 args.repeats)
        explain_s = best_per_image(explainer.heatmaps, images, args.repeats)
        results[name] = {"method": explainer.method, "score_ms": round(1000 * score_s, 1),
                         "explain_ms": round(1000 * explain_s, 1),
                         "ratio": round(explain_s / score_s, 2)}
        print(f"{name:11s} {explainer.method:18s} score {1000 * score_s:7.1f} ms/image  "
              f"explain {1000 * explain_s:7.1f} ms/image  ({explain_s / score_s:.2f}x)")
    save_json(args.json, {"size": args.size, "images": args.n, **results})


if __name__ == "__main__":
    main()
