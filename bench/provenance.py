"""Provenance parsing cost per image, as a ratio to decoding the same image.

Every path that scores an image also reads its provenance (`detector.verdicts.provenance.inspect`:
Pillow headers, EXIF, XMP, PNG text chunks, and a C2PA manifest lookup). This measures
that cost against `preprocess.load_image` at 224 px, in one run, on:
- ordinary photos without metadata (640x480 JPEG q90): the common case, aim < 10%;
- the same photos with camera EXIF;
- small JPEGs with a signed C2PA manifest (the manifest is parsed and validated);
- 640x480 PNGs without metadata (the stealth pnginfo check inflates their first rows),
  and with A1111's parameters hidden in the alpha channel's low bits.

    .venv/bin/python bench/provenance.py [--images 200]
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the signed fixtures the tests make

from _measure import per_item_ms, save_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "provenance.json"))
    args = parser.parse_args()

    import provenance_fixtures as fx
    from serve import photos

    from detector.io import preprocess
    from detector.verdicts import provenance

    plain = photos(args.images)
    exif = fx.camera_jpeg()  # EXIF block on a small image; grafted below on the photos
    camera = [fx.photo(size=(640, 480), seed=i, exif=_exif_of(exif), quality=90)
              for i in range(args.images)]
    chain = fx.test_chain()
    signed = [fx.c2pa_signed(fx.photo(size=(640, 480), seed=i, quality=90), "image/jpeg",
                             fx.AI, chain) for i in range(max(10, args.images // 10))]
    pngs = [fx.photo("PNG", size=(640, 480), seed=i) for i in range(max(10, args.images // 4))]
    stealth = [fx.stealth_png(size=(640, 480))] * max(10, args.images // 4)
    results = {}
    print(f"{'images':34s} {'decode ms':>9s} {'provenance ms':>13s} {'ratio':>7s}")
    for name, blobs in (("640x480 JPEG, no metadata", plain),
                        ("640x480 JPEG, camera EXIF", camera),
                        ("640x480 JPEG, signed C2PA manifest", signed),
                        ("640x480 PNG, no metadata", pngs),
                        ("640x480 PNG, stealth pnginfo", stealth)):
        decode = per_item_ms(lambda b: preprocess.load_image(b, 224), blobs)
        inspect = per_item_ms(provenance.inspect, blobs)
        results[name] = {"decode_ms": decode, "provenance_ms": inspect,
                         "ratio": inspect / decode}
        print(f"{name:34s} {decode:9.2f} {inspect:13.3f} {inspect / decode:6.1%}")
    save_json(args.json, results)


def _exif_of(blob: bytes):
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(blob)) as image:
        return image.getexif()


if __name__ == "__main__":
    main()
