"""The Serve endpoint over real HTTP on 127.0.0.1: contract, limits, auth, batching,
overload, autoscaling and the page in a real headless Chromium.

Two apps share one local Ray: "main" (route /) for the contract tests, and "tight"
(route /tight: API key, batch size 1, a one-request queue, 1..2 autoscaled replicas)
for auth, overload and autoscaling.
"""

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from artifacts import publish_exported, save_exported
from PIL import Image
from ray_cluster import free_port

from detector.io import preprocess
from detector.serving.app import ServeConfig, build_app, build_app_from_config
from detector.verdicts.verdict import classify_for

pytestmark = pytest.mark.e2e

SIZE = 32
MAX_BODY = 256 * 1024
MAX_VIDEO = 2 * MAX_BODY  # videos have a limit of their own
MAX_PIXELS = 1_000_000
API_KEY = "test-key-0123456789"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    """An untrained vit_tiny artifact: enough for the API, scores are deterministic. Its
    card says it was trained on JPEG, PNG and WebP (`SEEN`), as training records it, and
    names its ONNX export, which replicas load on OpenVINO as they load a trained model."""
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard

    uri = str(tmp_path_factory.mktemp("serve") / "vit_tiny")
    model = build_model("vit_tiny", image_size=SIZE)
    card = ModelCard(name="vit_tiny", architecture="vit", image_size=SIZE,
                     preprocess_version=preprocess.PREPROCESS_VERSION,
                     domain={"formats": sorted(SEEN), "long_side": [32, 96]})
    return save_exported(model, card, uri)


@pytest.fixture(scope="module")
def predictor(model_uri):
    from detector.model.predictor import Predictor

    return Predictor.from_uri(model_uri)


@pytest.fixture(scope="module")
def serve_port():
    """Serve on a free loopback port in a local Ray of our own (address="local": a
    `ray start` cluster elsewhere on the machine must not be joined)."""
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory) -> dict:
    """The main app's labels dataset, and the folder of images its labels may name."""
    root = tmp_path_factory.mktemp("reviewed")
    return {"labels": str(root / "labels"), "images": root / "images"}


@pytest.fixture(scope="module")
def base(serve_port, model_uri, reviewed) -> str:
    """The "main" app, built through `build_app(args)` with string values, as `serve run
    detector.serving:build_app key=value ...` would pass them."""
    from ray import serve

    args = {
        "model_uri": model_uri, "min_replicas": "1", "max_replicas": "1",
        "max_batch_size": "16", "batch_wait_timeout_s": "0.05",
        "max_body_bytes": str(MAX_BODY), "max_pixels": str(MAX_PIXELS),
        "max_video_bytes": str(MAX_VIDEO), "num_cpus": "0.5", "ingress_num_cpus": "0.25",
        # A variable nobody sets: a developer's exported DETECTOR_API_KEY must not leak in.
        "api_key_env": "DETECTOR_SERVE_TEST_UNSET",
        "labels_uri": reviewed["labels"], "scan_allow": str(reviewed["images"]),
    }
    serve.run(build_app(args), name="main", route_prefix="/")
    return f"http://127.0.0.1:{serve_port}"


@pytest.fixture(scope="module")
def tight(serve_port, model_uri) -> str:
    """The "tight" app: an API key (handed over as `detector serve` does: an argument,
    which Ray never logs), no batching, a queue of one (easy to overload) and fast
    autoscaling between 1 and 2 Model replicas."""
    from ray import serve

    config = ServeConfig(
        model_uri=model_uri, min_replicas=1, max_replicas=2, target_ongoing_requests=0.5,
        max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1,
        upscale_delay_s=1, downscale_delay_s=2, look_back_period_s=2, metrics_interval_s=0.5,
        num_cpus=0.5, ingress_num_cpus=0.25,
    )
    serve.run(build_app_from_config(config, api_key=API_KEY), name="tight",
              route_prefix="/tight")
    return f"http://127.0.0.1:{serve_port}/tight"


# --------------------------------------------------------------------------- images


def scene(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = 255 * (0.5 * x + 0.5 * y) * rng.uniform(0.5, 1, 3)
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **params)
    return buf.getvalue()


def encode_registered(pixels: np.ndarray, fmt: str, **params) -> bytes:
    """`encode` for the formats the product registers (HEIF through pillow-heif)."""
    from detector.io.preprocess import register_formats

    register_formats()
    return encode(pixels, fmt, **params)


SEEN = ("JPEG", "PNG", "WEBP")  # the formats model_uri's card says it was trained on
IMAGES = {
    "PNG": ("image/png", lambda: encode(scene(seed=1), "PNG")),
    "JPEG": ("image/jpeg", lambda: encode(scene(64, 48, seed=2), "JPEG", quality=90)),
    "WEBP": ("application/octet-stream", lambda: encode(scene(seed=3), "WEBP", lossless=True)),
    # What phones upload: an iPhone's HEIC, and AVIF.
    "HEIF": ("image/heic", lambda: encode_registered(scene(64, 48, seed=4), "HEIF", quality=90)),
    "AVIF": ("image/avif", lambda: encode(scene(64, 48, seed=5), "AVIF", quality=90)),
}


def post(url: str, data, content_type: str | None = "image/png", key: str | None = None,
         **kwargs) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(f"{url}/v1/detect", data=data, headers=headers, timeout=60, **kwargs)


def assert_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == code, body
    assert "Traceback" not in body["detail"]


def hammer(call: Callable[[], requests.Response], threads: int, per_thread: int) -> list:
    """`threads` workers released together, each making `per_thread` calls."""
    barrier = threading.Barrier(threads)

    def work() -> list:
        barrier.wait()
        return [call() for _ in range(per_thread)]

    with ThreadPoolExecutor(threads) as pool:
        return [r for rs in pool.map(lambda _: work(), range(threads)) for r in rs]


# --------------------------------------------------------------------------- contract


def test_serve_config_from_args_coerces_round_trips_and_rejects_unknown():
    config = ServeConfig.from_args({"model_uri": "m", "max_batch_size": "8", "num_gpus": "0.5",
                                    "max_ongoing_requests": "none", "scan_allow": "s3://a,/b"})
    assert (config.max_batch_size, config.num_gpus, config.max_ongoing_requests) == (8, 0.5, None)
    assert config.scan_allow == ("s3://a", "/b")
    assert config.model_max_ongoing() == 16
    config = ServeConfig.from_args({"model_uri": "m", "max_batch_size": "32"})
    assert config.model_max_ongoing() == 64
    assert ServeConfig.from_args(config.to_args()) == config  # what a YAML config carries
    with pytest.raises(ValueError, match="unknown serve args"):
        ServeConfig.from_args({"model_uri": "m", "max_batchsize": 8})
    with pytest.raises(ValueError, match="model_uri is required"):
        ServeConfig.from_args({})


@pytest.mark.parametrize("fmt", sorted(IMAGES))
def test_valid_image_scores_like_the_predictor(base, predictor, fmt):
    content_type, make = IMAGES[fmt]
    blob = make()
    response = post(base, blob, content_type)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predictor.predict_bytes([blob])[0]
    assert set(body) == {"score_ai", "verdict", "decided_by", "evidence", "threshold", "model",
                         "format", "width", "height", "generator", "generator_scores",
                         "generator_decided_by"}
    # A model without an attribution head (as every artifact before it) names no generator.
    assert (body["generator"], body["generator_scores"]) == (None, None)
    assert body["score_ai"] == pytest.approx(expected.score_ai, abs=1e-5)
    # A format the model never saw in training is flagged, as predict flags it.
    unseen = fmt not in SEEN
    assert body["verdict"] == ("uncertain" if unseen else
                               classify_for(predictor.card, body["score_ai"]))
    assert (body["decided_by"], body["evidence"]) == ("classifier", expected.evidence)
    assert [e["kind"] for e in body["evidence"]] == (["unfamiliar"] if unseen else [])
    assert (body["format"], body["width"], body["height"]) == (
        expected.format, expected.width, expected.height)
    assert body["threshold"] == predictor.card.threshold
    assert body["model"] == f"vit_tiny@{predictor.card.id}"
    assert int(response.headers["X-Batch-Size"]) >= 1


def test_provenance_decides_over_http_as_in_predict(base, predictor):
    """AI provenance decides, as real services and tools write it; camera EXIF is shown,
    never decides; HTTP answers what predict answers."""
    import provenance_fixtures as fx

    chain = fx.test_chain()
    signed = fx.c2pa_signed(fx.photo(), "image/jpeg", fx.AI, chain)
    # What real services and front-ends write: an AI claim carried in an ingredient, a
    # vendor assertion, A1111 in EXIF and in the alpha channel's low bits, ComfyUI in WebP.
    in_ingredient = fx.c2pa_signed(fx.photo(seed=2), "image/jpeg", None, chain, parent=signed,
                                   actions=[{"action": "c2pa.converted"}])
    firefly = fx.c2pa_signed(fx.photo(), "image/jpeg", None, chain, claim_version=1,
                             assertions=[{"label": "com.adobe.generative-ai",
                                          "data": {"description": "Adobe Firefly"}}])
    cases = [(signed, "image/jpeg", "provenance", None),
             (in_ingredient, "image/jpeg", "provenance", None),
             (firefly, "image/jpeg", "provenance", "Adobe Firefly"),
             (fx.a1111_exif("JPEG"), "image/jpeg", "provenance", "AUTOMATIC1111"),
             (fx.stealth_png(), "image/png", "provenance", None),
             (fx.comfyui_webp(), "image/webp", "provenance", "ComfyUI"),
             (fx.camera_jpeg(), "image/jpeg", "classifier", None)]
    for blob, content_type, decided_by, generator in cases:
        body = post(base, blob, content_type).json()
        expected = predictor.predict_bytes([blob])[0]
        assert (body["verdict"], body["decided_by"]) == (expected.verdict, decided_by)
        assert body["evidence"] == expected.evidence
        # The tool the file names is the generator, even from a model without a head.
        assert (body["generator"], expected.generator) == (generator, generator)
        assert body["generator_decided_by"] == ("provenance" if generator else None)
    assert body["evidence"][0]["kind"] == "camera"  # the last one: weak, shown


def test_labels_from_16_concurrent_reviewers_are_all_stored_exactly_once(base, reviewed):
    """400 labels in 80 batches from 16 clients at once: every one stored once, each batch
    its own part; refused batches (unknown or forbidden URIs, bad values) store nothing."""
    import concurrent.futures

    from detector.data import labels

    folder = reviewed["images"]
    folder.mkdir(exist_ok=True)
    uris = []
    for i in range(400):
        (folder / f"img-{i:03d}.png").write_bytes(IMAGES["PNG"][1]())
        uris.append(str(folder / f"img-{i:03d}.png"))

    def post_batch(first: int) -> requests.Response:
        batch = [{"uri": uri, "label": ("real", "ai-generated")[j % 2]}
                 for j, uri in enumerate(uris[first:first + 5], start=first)]
        return requests.post(f"{base}/v1/labels", timeout=120, json={
            "labels": batch, "reviewer": f"reviewer-{first % 16}"})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post_batch, range(0, 400, 5)))
    assert [a.status_code for a in answers] == [201] * 80, answers[0].text
    assert len({a.json()["batch"] for a in answers}) == 80
    stored, summary = labels.latest(reviewed["labels"])
    assert summary == {"labels": 400, "images": 400, "conflicting": 0}
    assert sorted(stored.column("uri").to_pylist()) == uris
    assert [row["label"] for row in sorted(stored.to_pylist(), key=lambda r: r["uri"])] == \
        [("real", "ai-generated")[i % 2] for i in range(400)]

    def refused(items: list, status: int, code: str) -> None:
        answer = requests.post(f"{base}/v1/labels", json={"labels": items}, timeout=30)
        assert_error(answer, status, code)

    refused([{"uri": uris[0], "label": "ai-generated"},
             {"uri": str(folder / "never-written.png"), "label": "real"}], 422, "unknown-uri")
    refused([{"uri": "/etc/passwd", "label": "real"}], 403, "forbidden")
    refused([{"uri": uris[0], "label": "fake"}], 422, "invalid-request")
    refused([{"uri": uris[0], "label": "real", "generator": "sdxl"}], 422, "invalid-label")
    refused([{"sha256": "ab" * 31, "label": "real"}], 422, "invalid-request")
    refused([], 422, "invalid-request")
    assert labels.latest(reviewed["labels"])[1]["labels"] == 400  # nothing half-stored
    # A later decision on the same image wins; the disagreement is counted.
    again = requests.post(f"{base}/v1/labels", timeout=30, json={"labels": [
        {"uri": uris[0], "label": "ai-generated", "generator": "sdxl", "note": "on review"}]})
    assert again.status_code == 201, again.text
    stored, summary = labels.latest(reviewed["labels"])
    assert summary == {"labels": 401, "images": 400, "conflicting": 1}
    [first] = [r for r in stored.to_pylist() if r["uri"] == uris[0]]
    assert (first["label"], first["generator"], first["reviewer"]) == \
        ("ai-generated", "sdxl", "api-key")


def test_consistency_checks_over_http_as_in_predict(base, predictor):
    """`?consistency=true` scores the re-encoded copies through the same replicas and
    decides as `predict --consistency` does; a malformed flag is a 422."""
    for fmt in ("PNG", "JPEG"):
        content_type, make = IMAGES[fmt]
        blob = make()
        body = post(base, blob, content_type, params={"consistency": "true"}).json()
        expected = predictor.predict_bytes([blob], consistency=True)[0]
        assert body["score_ai"] == pytest.approx(expected.score_ai, abs=1e-5)
        assert (body["verdict"], body["decided_by"]) == (expected.verdict, expected.decided_by)
        assert [e["source"] for e in body["evidence"]] == \
            [e["source"] for e in expected.evidence]
    assert_error(post(base, blob, content_type, params={"consistency": "maybe"}), 422,
                 "invalid-request")


def test_explain_adds_a_heatmap_and_leaves_the_score(base, predictor):
    """`?explain=true`: the same answer plus a PNG at the input's aspect ratio, from the
    pixels that were scored; two different images give two different heatmaps."""
    wide, other = encode(scene(96, 48, seed=5), "PNG"), encode(scene(96, 48, seed=6), "PNG")
    plain = post(base, wide).json()
    explained = post(base, wide, params={"explain": "true"})
    assert explained.status_code == 200, explained.text
    body = explained.json()
    assert body["explanation"] == "attention-rollout"
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert overlay.format == "PNG" and overlay.size == (96, 48)
    extras = ("heatmap_png", "explanation")
    assert {k: v for k, v in body.items() if k not in extras} == \
        {k: v for k, v in plain.items() if k not in extras}
    assert "heatmap_png" not in plain and "explanation" not in plain
    second = post(base, other, params={"explain": "true"}).json()
    assert second["heatmap_png"] != body["heatmap_png"]
    assert_error(post(base, wide, params={"explain": "yes"}), 422, "invalid-request")


def test_multipart_upload(base, predictor):
    blob = IMAGES["JPEG"][1]()
    response = requests.post(f"{base}/v1/detect", files={"file": ("a.jpg", blob, "image/jpeg")},
                             timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["score_ai"] == pytest.approx(
        predictor.predict_bytes([blob])[0].score_ai, abs=1e-5)
    missing = requests.post(f"{base}/v1/detect", files={"other": ("a.jpg", blob)}, timeout=60)
    assert_error(missing, 422, "missing-file")


def test_a_video_gets_over_http_what_predict_answers(base, predictor):
    """An MP4 sent as video/mp4, a WebM as raw bytes and a MOV in a multipart form are
    each scored by their sampled frames, as predict scores them; a video cut short, an
    audio-only MP4 and one over the video limit get JSON 4xx, and so does asking for a
    consistency check or a heatmap of a video."""
    from video_fixtures import audio_only, make_video

    mp4, webm = make_video("mp4", (1,) * 12 + (0,) * 12), make_video("webm")
    mov = make_video("mov", (0,) * 24)
    answers = [post(base, mp4, "video/mp4"), post(base, webm, "application/octet-stream"),
               requests.post(f"{base}/v1/detect", timeout=60,
                             files={"file": ("clip.mov", mov, "video/quicktime")})]
    for blob, response in zip([mp4, webm, mov], answers, strict=True):
        assert response.status_code == 200, response.text
        body, expected = response.json(), predictor.predict_bytes([blob])[0]
        assert (body["media"], body["frames_scored"]) == ("video", 16)
        assert (body["verdict"], body["decided_by"], body["evidence"], body["format"]) == (
            expected.verdict, expected.decided_by, expected.evidence, expected.format)
        assert body["score_ai"] == pytest.approx(expected.score_ai, abs=1e-5)
        assert body["frame_scores"] == pytest.approx(expected.frame_scores, abs=1e-5)
        assert body["frame_times_s"] == expected.frame_times_s
        assert body["worst_frame_s"] == expected.worst_frame_s
        assert body["duration_s"] == pytest.approx(expected.duration_s)
        assert (body["width"], body["height"]) == (64, 48)
    assert_error(post(base, mp4[: len(mp4) * 2 // 3], "video/mp4"), 400, "truncated")
    assert_error(post(base, audio_only(), "video/mp4"), 400, "not-a-video")
    assert_error(post(base, mp4 + bytes(MAX_VIDEO), "video/mp4"), 413, "too-large")
    for query in ("consistency=true", "explain=true"):
        refused = requests.post(f"{base}/v1/detect?{query}", data=mp4, timeout=60,
                                headers={"Content-Type": "video/mp4"})
        assert_error(refused, 422, "invalid-request")
    # A multipart body may carry a video up to the video limit, an image only up to its own.
    big = encode(np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8), "PNG")
    assert MAX_BODY < len(big) < MAX_VIDEO
    assert_error(requests.post(f"{base}/v1/detect", files={"file": ("big.png", big)},
                               timeout=60), 413, "too-large")


def local_error(blob: bytes) -> str:
    """The code the one preprocessing path gives `blob`, so the API must give the same."""
    with pytest.raises(preprocess.ImageError) as info:
        preprocess.load_image(blob, SIZE, max_bytes=MAX_BODY, max_pixels=MAX_PIXELS)
    return info.value.code


def psd(width: int = 8, height: int = 4) -> bytes:
    """A minimal Photoshop file as the format specifies it (Pillow reads PSD, never writes
    it): header, empty colour-mode, resource and layer sections, raw RGB planes."""
    import struct

    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)
    return header + sections + struct.pack(">H", 0) + bytes(range(3 * width * height))


def bad_inputs() -> dict[str, tuple[bytes, str, int, str]]:
    rng = np.random.default_rng(7)
    jpeg = encode(scene(200, 160, seed=4), "JPEG", quality=95)
    return {
        "empty": (b"", "image/jpeg", 400, "empty"),
        "random bytes": (rng.bytes(5000), "application/octet-stream", 400, "not-an-image"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "image/jpeg", 400, local_error(
            jpeg[: len(jpeg) // 2])),
        "pcx": (encode(scene(), "PCX"), "image/x-pcx", 415, "unsupported-format"),
        "ico": (encode(scene(32, 32), "ICO"), "image/x-icon", 415, "unsupported-format"),
        "psd": (psd(), "image/vnd.adobe.photoshop", 415, "unsupported-format"),
        "text/plain": (b"hello", "text/plain", 415, "unsupported-media-type"),
        "json": (b"{}", "application/json", 415, "unsupported-media-type"),
        "too many bytes": (rng.bytes(MAX_BODY + 1), "image/png", 413, "too-large"),
        "too many pixels": (encode(np.zeros((1000, 1001, 3), np.uint8), "PNG"), "image/png",
                            413, "too-large"),
    }


def test_bad_inputs_get_json_4xx_and_the_app_stays_healthy(base):
    for name, (blob, content_type, status, code) in bad_inputs().items():
        response = post(base, blob, content_type)
        assert response.status_code == status, (name, response.text)
        assert_error(response, status, code)
    refused = post(base, psd(), "application/octet-stream").json()
    assert "PSD is not accepted" in refused["detail"]  # the format named, and the list
    assert "HEIF" in refused["detail"] and "AVIF" in refused["detail"]
    assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
    assert post(base, IMAGES["PNG"][1]()).status_code == 200


def test_chunked_upload_over_the_limit_is_cut_off(base):
    # No Content-Length: the server must count while reading and stop at the limit.
    chunks = (b"\x89PNG" + bytes(64 * 1024) for _ in range(8))
    assert_error(post(base, chunks, "image/png"), 413, "too-large")


def test_unknown_route_and_method_are_json(base):
    assert_error(requests.get(f"{base}/nope", timeout=30), 404, "not-found")
    wrong = requests.get(f"{base}/v1/detect", timeout=30)
    assert_error(wrong, 405, "method-not-allowed")
    assert wrong.headers["Allow"] == "POST"
    # Two routes share /v1/scans: a 405 there names both methods, not the first route's.
    assert requests.delete(f"{base}/v1/scans", timeout=30).headers["Allow"] == "GET, POST"
    assert_error(post(base, IMAGES["PNG"][1](), params={"consistency": "maybe"}), 422,
                 "invalid-request")


def test_model_card_health_and_docs(base, predictor):
    card = requests.get(f"{base}/v1/model", timeout=30).json()
    assert card["id"] == predictor.card.id and card["image_size"] == SIZE
    assert {"name", "architecture", "threshold", "metrics", "created_at", "calibration",
            "domain", "generators", "attribution", "parent"} <= set(card)
    assert card["calibration"] == predictor.card.calibration
    health = requests.get(f"{base}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert requests.get(f"{base}/docs", timeout=30).status_code == 200
    spec = requests.get(f"{base}/openapi.json", timeout=30).json()
    assert "multipart/form-data" in spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    # Typed: every documented answer of every route has a schema (no `{}`): a model for
    # JSON, bytes for images (the review page's thumbnails and originals).
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if "image/*" in answer["content"]:
                    assert (path, status) == ("/v1/review/image", "200"), (path, status)
                    assert answer["content"]["image/*"]["schema"]["format"] == "binary"
                    continue
                schema = answer["content"]["application/json"]["schema"]
                assert "$ref" in schema, (method, path, status, schema)


def test_a_running_app_keeps_its_version_while_a_new_one_is_published(serve_port, tmp_path):
    """Training publishes OUT/<name>/<id>/ and moves latest.json: an app built from the
    name keeps scoring with the version it pinned, replicas started after the publish
    included, and every answer's model and threshold are that version's; building the
    app again moves it to the new version."""
    import keras
    from ray import serve

    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard
    from detector.model.predictor import Predictor

    name_uri = str(tmp_path / "models" / "vit_tiny")

    def publish(seed: int, threshold: float) -> tuple[str, ModelCard]:
        keras.utils.set_random_seed(seed)
        card = ModelCard(name="vit_tiny", architecture="vit", image_size=SIZE,
                         preprocess_version=preprocess.PREPROCESS_VERSION,
                         threshold=threshold, uncertain_margin=0.0)
        model = build_model("vit_tiny", image_size=SIZE)
        return publish_exported(model, card, name_uri), card  # replicas run OpenVINO

    first_uri, first = publish(1, 0.5)
    config = ServeConfig(model_uri=name_uri, min_replicas=1, max_replicas=1,
                         num_cpus=0.25, ingress_num_cpus=0.25,
                         api_key_env="DETECTOR_SERVE_TEST_UNSET")
    url = f"http://127.0.0.1:{serve_port}/versions"
    blob = IMAGES["PNG"][1]()

    def assert_served(uri: str, card: ModelCard) -> None:
        response = post(url, blob)
        assert response.status_code == 200, response.text
        body, expected = response.json(), Predictor.from_uri(uri).predict_bytes([blob])[0]
        assert body["model"] == f"vit_tiny@{card.id}" and body["threshold"] == card.threshold
        assert body["score_ai"] == pytest.approx(expected.score_ai, abs=1e-6)
        assert requests.get(f"{url}/v1/model", timeout=30).json()["id"] == card.id

    app = build_app_from_config(config)
    try:
        serve.run(app, name="versions", route_prefix="/versions")
        assert_served(first_uri, first)
        second_uri, second = publish(2, 0.3)
        assert Predictor.from_uri(name_uri).card.id == second.id  # the name moved on...
        assert_served(first_uri, first)  # ...the running app did not
        serve.delete("versions")  # replicas that start after the publish: still pinned
        serve.run(app, name="versions", route_prefix="/versions")
        assert_served(first_uri, first)
        serve.run(build_app_from_config(config), name="versions", route_prefix="/versions")
        assert_served(second_uri, second)  # told to: built again, it pins the new one
    finally:
        serve.delete("versions")


# The whole fuzz runs with a key; without one (the contract differs only in what it
# declares about auth) a third of it covers every operation and phase again.
@pytest.mark.parametrize("key,examples", [(API_KEY, 100), (None, 34)],
                         ids=["with-key", "default-no-key"])
def test_openapi_contract_holds_under_schemathesis(serve_port, model_uri, tmp_path, key,
                                                   examples):
    """`st run --checks all` against a running app, with a key and a scan allow-list and
    as `detector serve` starts it by default (no key), finds nothing: every status is
    documented, every body matches its schema, schema-valid requests are accepted and
    invalid ones refused, auth is declared exactly when it is enforced, 405s name the
    allowed methods. (tests/serving/schemathesis.toml says why a 400 for undecodable bytes is
    a valid answer to a schema-valid image body.)"""
    from ray import serve

    config = ServeConfig(model_uri=model_uri, max_replicas=1, max_body_bytes=MAX_BODY,
                         max_pixels=MAX_PIXELS, num_cpus=0.5, ingress_num_cpus=0.25,
                         scan_allow=(str(tmp_path / "allowed"),),
                         labels_uri=str(tmp_path / "labels"),
                         api_key_env="DETECTOR_SERVE_TEST_UNSET")
    serve.run(build_app_from_config(config, api_key=key), name="typed",
              route_prefix="/typed")
    spec = requests.get(f"http://127.0.0.1:{serve_port}/typed/openapi.json", timeout=30).json()
    secured = {path: sorted(ops) for path, ops in spec["paths"].items()
               if any("security" in op for op in ops.values())}
    assert bool(secured) == (key is not None), secured
    assert ("401" in spec["paths"]["/v1/detect"]["post"]["responses"]) == (key is not None)
    here = Path(__file__).parent
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file",
         str(here / "schemathesis.toml"), "run",
         f"http://127.0.0.1:{serve_port}/typed/openapi.json", "--checks", "all",
         # Every phase once, a fixed number of cases an operation (a seeded, fixed amount
         # of work: a time budget fuzzed less on slower or busier machines).
         "--max-examples", str(examples), "--workers", "2", "--seed", "1",
         *(["-H", f"Authorization: Bearer {key}"] if key else [])],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    serve.delete("typed")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    tested = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    # It really exercised the app: 100 cases an operation generated 500+ requests.
    assert tested and int(tested[1]) > 5 * examples, run.stdout[-3000:]


def test_concurrent_requests_share_batches(base):
    blob = IMAGES["PNG"][1]()
    responses = hammer(lambda: post(base, blob), threads=32, per_thread=3)
    assert {r.status_code for r in responses} == {200}
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert 1 < max(sizes) <= 16, sizes  # batches form, capped at the app's max_batch_size
    assert len({round(r.json()["score_ai"], 5) for r in responses}) == 1


# --------------------------------------------------------------------------- the page


def test_page_is_offline_html(base):
    page = requests.get(f"{base}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "{{settings}}" not in text and "v1/detect" in text
    assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): no
    port, no extra Python package."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-pipe")

    def __init__(self, user_data_dir: Path):
        child_in, self._out = os.pipe()
        self._in, child_out = os.pipe()

        def wire() -> None:  # runs in the child: Chromium reads fd 3, writes fd 4
            a, b = os.dup(child_in), os.dup(child_out)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *self.FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(child_in)
        os.close(child_out)
        self._buffer, self._next_id, self.session = b"", 0, None

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", width=900, height=900,
                  deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"never true: {expression}")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self._in)
        os.close(self._out)


# Skipped on a developer's machine without Chromium; under CI (which installs it, see
# .ci/run) a missing browser fails the test instead of hiding it.
@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                    reason=f"{CHROMIUM} not installed (apt-get install -y chromium)")
def test_page_in_headless_chromium(base, predictor, tmp_path):
    image = tmp_path / "upload.png"
    blob = IMAGES["PNG"][1]()
    image.write_bytes(blob)
    expected = predictor.predict_bytes([blob])[0]
    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(f"{base}/")
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.send("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
        kind = browser.wait_for(
            "['ai-generated','real','uncertain','error'].includes(result.className) "
            "&& result.className")
        # The explanation shows beside the upload, a decoded PNG of the upload's shape.
        shape = browser.wait_for("heatmap.complete && heatmap.naturalWidth > 0 && "
                                 "[heatmap.naturalWidth, heatmap.naturalHeight]")
        assert shape == [48, 40] and browser.evaluate("heatmap.title") == "attention-rollout"
        shot = browser.send("Page.captureScreenshot", format="png")["data"]
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "serve-page.png").write_bytes(base64.b64decode(shot))
        assert kind == expected.verdict, browser.evaluate("result.innerText")
        assert f"{100 * expected.score_ai:.1f}%" in browser.evaluate("score.textContent")
        assert "probability" in browser.evaluate("explain.textContent")

        # A file whose C2PA manifest declares AI (as ChatGPT writes it): the page says what
        # decided, why, and which generator the file names.
        import provenance_fixtures as fx

        assert browser.evaluate("generator.textContent") == ""  # none named
        signed = tmp_path / "signed.png"
        signed.write_bytes(fx.chatgpt_image(fx.test_chain()))
        browser.send("DOM.setFileInputFiles", files=[str(signed)], nodeId=node)
        browser.wait_for("evidence.children.length > 0")
        shot = browser.send("Page.captureScreenshot", format="png")["data"]
        (ARTIFACTS / "serve-page-provenance.png").write_bytes(base64.b64decode(shot))
        assert browser.evaluate("result.className") == "ai-generated"
        assert "provenance" in browser.evaluate("score.textContent")
        assert "c2pa (strong): trainedAlgorithmicMedia" in \
            browser.evaluate("evidence.textContent")
        assert browser.evaluate("generator.textContent") == \
            "Generator: OpenAI (named by the file's provenance)"

        # A video: previewed as one, decided by its frames, with a bar per sampled frame.
        from video_fixtures import make_video

        clip = tmp_path / "clip.mp4"
        clip.write_bytes(make_video("mp4", (1,) * 12 + (0,) * 12))
        expected = predictor.predict_bytes([clip.read_bytes()])[0]
        browser.send("DOM.setFileInputFiles", files=[str(clip)], nodeId=node)
        strip = "document.getElementById('frame-strip')"
        browser.wait_for(f"{strip}.children.length === 16")
        shot = browser.send("Page.captureScreenshot", format="png")["data"]
        (ARTIFACTS / "serve-page-video.png").write_bytes(base64.b64decode(shot))
        assert browser.evaluate("result.className") == expected.verdict
        assert "16 frames scored" in browser.evaluate("meta.textContent")
        assert browser.evaluate("[getComputedStyle(document.getElementById('preview-video'))"
                                ".display, getComputedStyle(preview).display]") == \
            ["block", "none"]
        first = f"{expected.frame_times_s[0]:.1f} s: score_ai {100 * expected.frame_scores[0]:.1f}%"
        assert browser.evaluate(f"{strip}.children[0].title") == first
    finally:
        browser.close()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# --------------------------------------------------------------------------- review


@pytest.fixture(scope="module")
def review_scan(base, reviewed) -> dict:
    """A scan started over HTTP of a folder with a C2PA-signed AI image (provenance decides
    it), its unsigned copy (a near-duplicate the classifier decides), scenes and a text
    file; returns once it has succeeded."""
    import provenance_fixtures as fx

    folder = reviewed["images"] / "review-scan"
    folder.mkdir(parents=True)
    signed = fx.chatgpt_image(fx.test_chain())
    (folder / "signed.png").write_bytes(signed)
    copy = np.asarray(Image.open(io.BytesIO(signed)).convert("RGB"))
    (folder / "copy.png").write_bytes(encode(copy, "PNG"))
    for i in range(4):
        (folder / f"scene-{i}.png").write_bytes(encode(scene(seed=20 + i), "PNG"))
    (folder / "notes.txt").write_text("not an image")
    out = reviewed["images"] / "review-report"
    started = requests.post(f"{base}/v1/scans", timeout=120,
                            json={"source": str(folder), "output": str(out)})
    assert started.status_code == 202, started.text
    scan_id, deadline = started.json()["id"], time.monotonic() + 300
    while True:
        state = requests.get(f"{base}/v1/scans/{scan_id}", timeout=30)
        if state.status_code == 200 and state.json()["status"] != "running":
            break
        assert time.monotonic() < deadline, state.text
        time.sleep(1)
    assert state.json()["status"] == "succeeded", state.text
    return {"id": scan_id, "folder": folder, "report": str(out)}


def worth_reviewing(out: str) -> list[dict]:
    """The report's rows a reviewer should see, by the rule, read with duckdb."""
    import duckdb

    rows = duckdb.sql(f"SELECT uri, verdict, decided_by FROM '{out}/part-*.parquet' "
                      "ORDER BY uri").fetchall()
    groups = duckdb.sql(f"SELECT uri, \"group\", verdict FROM '{out}/_near_duplicates.parquet'"
                        ).fetchall()
    verdicts: dict[str, set] = {}
    for _, group, verdict in groups:
        verdicts.setdefault(group, set()).add(verdict)
    mixed = {uri for uri, group, _ in groups if len(verdicts[group]) > 1}
    return [{"uri": uri, "reason": "uncertain" if verdict == "uncertain" else
             "classifier-ai" if (verdict, by) == ("ai-generated", "classifier") else
             "mixed-group"} for uri, verdict, by in rows
            if verdict == "uncertain" or (verdict, by) == ("ai-generated", "classifier")
            or uri in mixed]


def test_review_lists_the_rows_worth_a_human_and_serves_their_thumbnails(base, review_scan):
    folder, out = review_scan["folder"], review_scan["report"]
    page = requests.get(f"{base}/v1/scans/{review_scan['id']}/review", timeout=60)
    assert page.status_code == 200, page.text
    body = page.json()
    expected = worth_reviewing(out)
    assert [(r["uri"], r["reason"]) for r in body["rows"]] == \
        [(r["uri"], r["reason"]) for r in expected]
    assert body["total"] == len(expected) and body["report"] == out
    # The unsigned copy is always worth a look: the classifier called it AI, or not,
    # beside a near-duplicate whose provenance says AI.
    rows = {r["uri"]: r for r in body["rows"]}
    copy, signed = str(folder / "copy.png"), str(folder / "signed.png")
    assert copy in rows
    if rows[copy]["verdict"] != "ai-generated":
        assert rows[signed]["reason"] == "mixed-group" and rows[signed]["group_size"] == 2
        assert sorted(rows[signed]["group_verdicts"]) == \
            sorted({"ai-generated", rows[copy]["verdict"]})
    assert requests.get(f"{base}/v1/review", params={"report": out}, timeout=60).json() == body
    second = requests.get(f"{base}/v1/review", timeout=60,
                          params={"report": out, "offset": 1, "limit": 1}).json()
    assert second["rows"] == body["rows"][1:2] and second["total"] == body["total"]

    thumb = requests.get(f"{base}/v1/review/image", params={"uri": copy}, timeout=60)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == (160, 160)
    original = requests.get(f"{base}/v1/review/image", timeout=60,
                            params={"uri": signed, "original": "true"})
    assert original.content == (folder / "signed.png").read_bytes()
    assert original.headers["content-type"] == "image/png"

    # A video's thumbnail is its middle frame; its original comes back as a video.
    from video_fixtures import make_video

    clip = folder / "clip.mp4"
    clip.write_bytes(make_video("mp4"))
    thumb = requests.get(f"{base}/v1/review/image", params={"uri": str(clip)}, timeout=60)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == (160, 160)
    original = requests.get(f"{base}/v1/review/image", timeout=60,
                            params={"uri": str(clip), "original": "true"})
    assert original.headers["content-type"] == "video/mp4"
    clip.write_bytes(make_video("mp4")[:2000])  # cut short: a JSON 4xx, as for an image
    cut = requests.get(f"{base}/v1/review/image", params={"uri": str(clip)}, timeout=60)
    assert_error(cut, 422, "truncated")
    clip.unlink()

    def refused(path: str, params: dict, status: int, code: str) -> None:
        assert_error(requests.get(f"{base}{path}", params=params, timeout=60), status, code)

    refused("/v1/review/image", {"uri": "/etc/passwd"}, 403, "forbidden")
    refused("/v1/review/image", {"uri": str(folder / "gone.png")}, 404, "not-found")
    refused("/v1/review/image", {"uri": str(folder / "notes.txt")}, 422, "not-an-image")
    refused("/v1/review", {}, 422, "invalid-request")
    refused(f"/v1/scans/{'0' * 12}/review", {}, 404, "not-found")
    refused("/v1/review", {"report": "/etc"}, 403, "forbidden")
    refused("/v1/review", {"report": str(folder)}, 404, "not-found")  # no committed report
    refused("/v1/review", {"report": out, "limit": 0}, 422, "invalid-request")


@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                    reason=f"{CHROMIUM} not installed (apt-get install -y chromium)")
def test_review_page_in_headless_chromium(base, review_scan, reviewed, tmp_path):
    """Load the scan's review page, press `a` on the first row: the label is stored, with
    the reviewer typed in; `h` shows the heatmap of the row it moved to."""
    from detector.data import labels

    browser = Chromium(tmp_path / "profile")
    try:
        browser.open(f"{base}/review?scan={review_scan['id']}")
        count = browser.wait_for("document.querySelectorAll('.row').length")
        assert count == len(worth_reviewing(review_scan["report"]))
        browser.wait_for("[...document.querySelectorAll('.thumb')].every("
                         "(i) => i.complete && i.naturalWidth === 160)")
        first = browser.evaluate("document.querySelector('.row.current').dataset.uri")
        browser.evaluate("document.getElementById('reviewer').value = 'ana'")
        browser.send("Input.dispatchKeyEvent", type="keyDown", key="a", text="a")
        browser.send("Input.dispatchKeyEvent", type="keyUp", key="a")
        state = browser.wait_for("document.querySelector('.row').dataset.state")
        assert state == "labelled-ai-generated", \
            browser.evaluate("document.querySelector('.row .status').textContent")
        stored = [row for row in labels.latest(reviewed["labels"])[0].to_pylist()
                  if row["uri"] == first]
        assert [(r["label"], r["reviewer"]) for r in stored] == [("ai-generated", "ana")]
        current = browser.evaluate("[...document.querySelectorAll('.row')].findIndex("
                                   "(r) => r.classList.contains('current'))")
        assert current == min(1, count - 1)
        browser.send("Input.dispatchKeyEvent", type="keyDown", key="h", text="h")
        browser.wait_for("document.querySelector('.row.current .heat').naturalWidth > 0")
        shot = browser.send("Page.captureScreenshot", format="png")["data"]
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "review-page.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# --------------------------------------------------------------------------- tight app


def model_replicas() -> dict[str, int]:
    from ray import serve

    deployment = serve.status().applications["tight"].deployments["Model"]
    return {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}


def wait_for_replicas(predicate: Callable[[dict], bool], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = model_replicas()
        if predicate(states):
            return states
        time.sleep(0.5)
    raise AssertionError(f"replicas never matched; last {model_replicas()}")


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(tight):
    wait_for_replicas(lambda s: s == {"RUNNING": 1}, timeout=30)
    blob = IMAGES["PNG"][1]()
    stop, statuses = threading.Event(), set()

    def load() -> None:  # 4 clients against a target of 0.5 ongoing requests per replica
        while not stop.is_set():
            statuses.add(post(tight, blob, key=API_KEY).status_code)

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        # A replica starts in seconds on an idle machine; loaded, its TensorFlow import
        # and model load took over 90 s (seen on a slower 2-core CPU).
        wait_for_replicas(lambda s: s.get("RUNNING", 0) == 2, timeout=300)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert 200 in statuses and statuses <= {200, 503}, statuses
    wait_for_replicas(lambda s: s == {"RUNNING": 1}, timeout=180)
    assert post(tight, blob, key=API_KEY).status_code == 200


def test_api_key_is_required_when_set(tight):
    blob = IMAGES["PNG"][1]()
    assert_error(post(tight, blob), 401, "unauthorized")
    assert_error(post(tight, blob, key="wrong-key"), 401, "unauthorized")
    assert_error(post(tight, blob, key=API_KEY[:-1]), 401, "unauthorized")
    basic = requests.post(f"{tight}/v1/detect", data=blob, timeout=60,
                          headers={"Authorization": f"Basic {API_KEY}"})
    assert_error(basic, 401, "unauthorized")
    assert post(tight, blob, key=API_KEY).status_code == 200
    assert_error(requests.get(f"{tight}/v1/model", timeout=30), 401, "unauthorized")
    assert_error(requests.post(f"{tight}/v1/labels", timeout=30, json={"labels": [
        {"uri": "/x.jpg", "label": "real"}]}), 401, "unauthorized")
    assert requests.get(f"{tight}/healthz", timeout=30).status_code == 200
    assert '"auth": true' in requests.get(f"{tight}/", timeout=30).text


def test_overload_gets_json_503_not_a_hang(tight):
    blob = IMAGES["PNG"][1]()
    responses = hammer(lambda: post(tight, blob, key=API_KEY), threads=32, per_thread=2)
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    assert {r.headers["X-Batch-Size"] for r in responses if r.status_code == 200} == {"1"}
    rejected = next(r for r in responses if r.status_code == 503)
    assert_error(rejected, 503, "overloaded")
    assert rejected.headers["Retry-After"] == "1"
    assert requests.get(f"{tight}/healthz", timeout=30).status_code == 200


# --------------------------------------------------------------------------- observability


def test_logs_are_structured_and_never_hold_the_key_or_the_image():
    """Every log of this Ray session (Serve's, workers', the raylet's, the runtime-env and
    dashboard agents'), not only Serve's. (Ray's runtime_env agent logs env_vars, which is
    why a key is handed to the ingress as an argument, never through runtime_env.)"""
    import ray

    session = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    logs = session / "serve"
    ingress = [p.read_text(errors="replace") for p in logs.glob("replica_tight_Ingress_*.log")]
    lines = [json.loads(line.split(" -- ", 1)[1]) for text in ingress
             for line in text.splitlines() if '"event": "detect"' in line]
    assert {(r["status"], r["code"]) for r in lines} >= {(401, "unauthorized"), (200, "ok"),
                                                         (503, "overloaded")}
    assert all({"latency_ms", "batch_size", "bytes"} <= set(r) for r in lines)
    files = [p for p in session.rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.parent.name == "serve" for p in files)
    for path in files:
        content = path.read_bytes()
        assert API_KEY.encode() not in content, path
        assert b"IHDR" not in content, path  # no PNG bytes either


def test_request_metrics_reach_prometheus():
    import ray

    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"

    def missing() -> list[str]:
        lines = requests.get(url, timeout=10).text.splitlines()
        found = {
            "401 counted by code": any(
                line.startswith("ray_detector_requests") and 'code="unauthorized"' in line
                and 'status="401"' in line for line in lines),
            "latency histogram": any(
                line.startswith("ray_detector_request_latency_s_bucket") for line in lines),
            "batch size histogram": any(
                line.startswith("ray_detector_batch_size_bucket") for line in lines),
        }
        return [name for name, ok in found.items() if not ok]

    deadline = time.monotonic() + 60
    while missing() and time.monotonic() < deadline:  # replicas push every few seconds
        time.sleep(2)
    assert not missing()


def test_detector_serve_stops_cleanly_on_sigterm(model_uri, tmp_path):
    """`detector serve` started its own Ray; SIGTERM (what Kubernetes and systemd send)
    shuts Serve and that Ray down: no raylet, dashboard agent or runtime-env agent is left."""
    import signal
    import subprocess
    import sys

    import psutil
    import requests

    port = free_port()
    # Its own Ray, as on a laptop; never a `ray start` cluster another test runs.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [Path(sys.executable).parent / "detector", "serve", "--model", model_uri,
         "--port", str(port), "--max-replicas", "1"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).ok:
                    break
            except requests.RequestException:  # not listening yet, or still starting
                pass
            time.sleep(1)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in started)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        output = log.read_text()
        assert proc.returncode == 0, output[-3000:]
        assert "shutting down" in output
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
