"""The residual check's cost per image, as a ratio to decoding the same image.

Every path that scores an image with a card that holds the real images' residual model
(`detector.verdicts.residual`) computes its residual spectrum from the model's input
pixels. This measures that against `preprocess.load_image` of 640x480 JPEGs at 224 px
(the baseline, in the same run), one image at a time (as a server does) and in batches of
64 (as a scan's scoring actor does), and the distance to the model on top.

    .venv/bin/python bench/residual.py [--images 200] [--size 224]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _measure import machine, per_item_ms, print_machine, save_json

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "residual.json"))
    args = parser.parse_args()

    from serve import photos

    from detector.io import preprocess
    from detector.verdicts import residual

    info = machine()
    print_machine(info)
    blobs = photos(args.images)
    pixels = np.stack([preprocess.load_image(b, args.size)[0] for b in blobs])
    every = residual.features(pixels)  # a model fitted on them all: the cost is the same
    model = residual.Model.from_card({"residual": residual.fit(every, every)})
    if model is None:
        parser.error(f"--images: at least {2 * residual.FEATURES} to fit the model")
    batches = [pixels[i:i + 64] for i in range(0, len(pixels), 64)]
    decode = per_item_ms(lambda b: preprocess.load_image(b, args.size), blobs)
    single = per_item_ms(lambda p: model.findings(p[None]), list(pixels))
    batched = per_item_ms(model.findings, batches) * len(batches) / len(pixels)
    results = {"size": args.size, "decode_ms": decode, "single_ms": single,
               "batched_ms": batched, "single_ratio": single / decode,
               "batched_ratio": batched / decode}
    print(f"decode 640x480 JPEG to {args.size} px: {decode:.2f} ms/image (the baseline)")
    print(f"residual check, one image at a time: {single:.2f} ms/image "
          f"({single / decode:.0%} of decoding)")
    print(f"residual check, batches of 64: {batched:.2f} ms/image "
          f"({batched / decode:.0%} of decoding)")
    save_json(args.json, {"machine": info, "args": vars(args), **results})


if __name__ == "__main__":
    main()
