"""Ray Serve application: an HTTP ingress that decodes images in front of a batching model.

    Ingress (FastAPI)  --uint8 pixels-->  Model (@serve.batch, autoscaled)

The ingress checks the key, the content type and the size limits, and decodes with the ONE
preprocessing path; the model deployment only ever sees fixed-size uint8 arrays, which it
stacks into one forward pass for all concurrent requests. Built by `build_app(args)`, so it
runs the same under `serve run detector.serving:build_app model_uri=...`, a `serve deploy`
config file or a KubeRay RayService (`import_path: detector.serving:build_app`).

HTTP contract (typed in detector.serving.api, published at /openapi.json): `POST /v1/detect`,
`GET /healthz`, `GET /v1/model`, `POST /v1/scans`, `GET /v1/scans[/{id}]`, `GET /`.
Every error body is JSON `{error, detail}`; a 5xx never carries a traceback.
"""

import asyncio
import base64
import dataclasses
import functools
import hmac
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from detector.config import ServeConfig
from detector.io import console, preprocess, video
from detector.io.threads import reserved_threads
from detector.model.artifact import ModelCard, resolve
from detector.model.explain import Explainer, overlay_png
from detector.model.predictor import Predictor
from detector.scanning import service as scan_service
from detector.serving import api, review
from detector.serving import labels as label_store
from detector.verdicts import consistency, familiarity, provenance, residual
from detector.verdicts.attribution import attribute_for
from detector.verdicts.verdict import classify_for, decide_for
from detector.verdicts.video import decide_video

# Serve routes the "ray.serve" logger into each replica's log file with the request id.
log = logging.getLogger("ray.serve")

APP_NAME = "detector"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file itself
RAW_TYPES = ("application/octet-stream",)  # plus image/* and a missing Content-Type
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


class ApiError(Exception):
    """A client-visible failure: HTTP status, short code, human detail."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.headers = status, code, detail, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.detail, self.headers)


def error_response(
    status: int, code: str, detail: str, headers: dict | None = None
) -> JSONResponse:
    return _json(api.ErrorBody(error=code, detail=detail), status, headers)


def _json(body: api.ApiModel, status: int = 200, headers: dict | None = None) -> JSONResponse:
    """A response built through its contract model (api.py): what we send is what we say."""
    # exclude_unset: optional fields nobody asked for (?explain) stay out of the answer.
    return JSONResponse(body.model_dump(mode="json", exclude_unset=True), status_code=status,
                        headers=headers)


# Helpers come before the deployments: Serve pickles the decorated classes by value at
# decoration time, so anything they call must already exist.


MAX_SCAN_REQUEST_BYTES = 64 * 1024  # {source, output}: two URIs
MAX_LABELS_REQUEST_BYTES = 4 * 1024 * 1024  # up to labels.MAX_BATCH labels with notes


def _flag(value: str | None, name: str) -> bool:
    """A boolean query parameter, as the schema says: true or false (any case); absent is
    false; anything else, an empty value too, is a 422."""
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ApiError(422, "invalid-request", f"{name} must be true or false, not {value!r}")


async def read_bounded(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) anything over `limit` without holding more than that."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad-request", "invalid Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, "too-large", f"{declared} bytes exceeds the limit of {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:  # a chunked upload, or a Content-Length that lied
            raise ApiError(413, "too-large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_file(request: Request, body: bytes) -> bytes:
    """The `file` part of a multipart body that has already been read (bounded)."""
    replay = Request(request.scope, receive=_replayer(body))
    try:
        form = await replay.form(max_files=1, max_fields=8)
    except Exception as exc:
        raise ApiError(400, "bad-multipart", f"unreadable multipart body: {exc}") from None
    try:
        part = form.get("file")
        if not isinstance(part, UploadFile):
            raise ApiError(422, "missing-file", "multipart body has no file field named `file`")
        return await part.read()
    finally:
        await form.close()


def _replayer(body: bytes):
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


BINARY = {"type": "string", "format": "binary"}


def _render_page(card: dict[str, Any], auth: bool, name: str = "index.html") -> str:
    page = resources.files("detector.serving").joinpath(f"static/{name}").read_text()
    settings = {"auth": auth, "model": card["name"], "threshold": card["threshold"],
                "margin": card["uncertain_margin"], "generators": card.get("generators") or []}
    # "</" cannot appear inside the JSON, so it cannot close the <script> element early.
    return page.replace("{{settings}}", json.dumps(settings).replace("</", "<\\/"))


# ---------------------------------------------------------------------------------------------
# Model deployment: uint8 batches -> scores
# ---------------------------------------------------------------------------------------------


@serve.deployment(name="Model")
class Model:
    """Holds one Predictor; concurrent `score` calls are stacked into one forward pass."""

    def __init__(self, config: ServeConfig):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import

        # Not every core of the host.
        threads = reserved_threads(config.num_cpus, config.num_gpus)
        self.predictor = Predictor.from_uri(
            config.model_uri, batch_size=config.max_batch_size, backend=config.backend,
            precision=config.precision, threads=threads)
        # The decorator's arguments are fixed at import; the configured values apply here.
        self.score.set_max_batch_size(config.max_batch_size)
        self.score.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        size = self.predictor.image_size
        self._probe = np.zeros((1, size, size, 3), dtype=np.uint8)
        self.predictor.score(self._probe)  # trace the graph now, not on the first request
        self.batch_sizes = Histogram(
            "detector_batch_size", "images per forward pass", boundaries=BATCH_BUCKETS
        )
        self.model_uri = config.model_uri  # the pinned version: explanations load the same
        self._explainer = None

    def explain(self, pixels: np.ndarray) -> tuple[np.ndarray, str]:
        """(heatmap in [0, 1], method) for one decoded image; the Keras model of this same
        version loads on the first request that asks (scores never come from it)."""
        if self._explainer is None:

            self._explainer = Explainer.from_uri(self.model_uri)
        return self._explainer.heatmaps(pixels[None])[0], self._explainer.method

    def card(self) -> dict[str, Any]:
        return dataclasses.asdict(self.predictor.card)

    def ping(self) -> str:
        return self.predictor.card.id

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score(self, images: list[np.ndarray]
                    ) -> list[tuple[float, np.ndarray | None, int]]:
        """One decoded image per caller -> (score_ai, its attribution head's output or
        None, size of the batch it ran in)."""
        # The forward pass blocks this replica's user event loop ON PURPOSE. Serve 2.60 starts
        # forming the next batch as soon as this one is dispatched, so with the pass in a
        # worker thread the next batch is whatever trickles in during batch_wait_timeout_s
        # (measured with ResNet50V2 and 32 clients: mean batch 2). Blocked, arrivals wait in
        # the replica's queue and the next batch takes all of them (mean 24, same load).
        # Serve's own control loop runs on another thread and stays responsive.
        scores, heads = self.predictor.score_and_attribute(np.stack(images))
        self.batch_sizes.observe(len(images))
        return [(float(s), None if heads is None else heads[i], len(images))
                for i, s in enumerate(scores)]

    def score_pixels(self, pixels: np.ndarray) -> dict[str, Any]:
        """A whole batch from a bucket scan (already batched by the scan) -> scores, so
        scans and online traffic share these autoscaled replicas. The answer names the
        model, so a scan can tell when a redeployed app serves another one."""
        scores, heads = self.predictor.score_and_attribute(pixels)
        self.batch_sizes.observe(len(pixels))
        return {"scores": scores, "heads": heads, "model": self.predictor.card.id}

    async def check_health(self) -> None:
        """Serve restarts the replica when this raises: the model must still score."""
        scores = self.predictor.score(self._probe)  # on the loop, between batches (see score)
        if scores.shape != (1,) or not 0.0 <= float(scores[0]) <= 1.0:
            raise RuntimeError(f"model produced an invalid score: {scores!r}")


# ---------------------------------------------------------------------------------------------
# Ingress deployment: HTTP in, JSON out
# ---------------------------------------------------------------------------------------------

app = FastAPI(
    title="AI-generated image detector",
    description="POST an image, get P(AI-generated) (`score_ai`) and a verdict.",
    version="1",
    # Served by the Ingress itself (`openapi_`, `docs_`): the document depends on whether
    # this app has a key, which FastAPI's own route cannot know.
    openapi_url=None, docs_url=None, redoc_url=None,
)


def openapi_document(fastapi_app: FastAPI, root_path: str, auth: bool) -> dict[str, Any]:
    """The app's OpenAPI document as configured: bearer auth and its 401s only when it
    has a key (a document that demands a key nobody checks is a contract it breaks), and
    the prefix the app is served under as its server, as FastAPI's own route gives it."""
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(
        title=fastapi_app.title, version=fastapi_app.version,
        description=fastapi_app.description, routes=fastapi_app.routes,
        servers=[{"url": root_path}] if root_path else None)
    if not auth:
        document.get("components", {}).pop("securitySchemes", None)
        for operations in document["paths"].values():
            for operation in operations.values():
                operation.pop("security", None)
                operation["responses"].pop("401", None)
    return document


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # Starlette names only the first route's methods
        headers = {**(headers or {}), "Allow": ", ".join(_methods_at(request))}
    return error_response(exc.status_code, code, str(exc.detail), headers)


def _methods_at(request: Request) -> list[str]:
    """Every method some route serves at this request's path."""
    probe = {**request.scope, "method": ""}  # matches on the path alone: Match.PARTIAL
    return sorted({method for route in _leaf_routes(request.app.routes)
                   if route.matches(probe)[0] != Match.NONE
                   for method in getattr(route, "methods", None) or ()})


def _leaf_routes(routes: list) -> Iterator[Any]:
    # Serve re-mounts the Ingress's methods in an included router (FastAPI >= 0.137 keeps
    # it as one node holding `original_router`).
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from _leaf_routes(inner.routes) if inner is not None else (route,)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid-request", str(exc.errors())[:500])


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # The last net: log the traceback server-side, never send it to the client.
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal", "internal error; see the server logs")


# The image body is read by hand (bounded; raw or multipart), so FastAPI cannot see it:
# document it, and the query flag, here.
DETECT_DOC = {
    "parameters": [{
        "name": "consistency", "in": "query", "required": False,
        "schema": {"type": "boolean", "default": False},
        "description": "also score a JPEG-75 re-save and a 0.5x resize; the verdict is "
                       "uncertain when theirs disagree (see the evidence)",
    }, {
        "name": "explain", "in": "query", "required": False,
        "schema": {"type": "boolean", "default": False},
        "description": "add `heatmap_png`: where the model looked (Grad-CAM or attention "
                       "rollout), over the image; the score is unchanged",
    }],
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "video/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    },
}
SCAN_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": api.ScanRequest.model_json_schema()}}}}
BATCH_HEADER = {"X-Batch-Size": {"description": "how many requests shared this forward pass",
                                 "schema": {"type": "string"}}}
# Documented on every route that checks the key (it is required only when the app has one).
BEARER = [Depends(HTTPBearer(auto_error=False, description="the app's API key, when set"))]


@dataclass
class _Outcome:
    """What one /v1/detect request did, for the metrics and the log line."""

    code: str = "ok"
    bytes: int = 0
    batch_size: int = 0
    stages_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    def lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stages_ms[stage] = round(1000 * (now - since), 2)
        return now


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """Validates and decodes uploads, then asks the Model deployment for a score."""

    async def __init__(
        self, model: DeploymentHandle, config: ServeConfig, api_key: str | None = None
    ):
        self.model = model
        self.config = config
        key = api_key or os.environ.get(config.api_key_env, "")
        self._key = key.encode() if key else None
        provenance.check_settings()  # a bad trust-anchor setting fails the replica here
        # Decode at the model's own size: ask it once, at startup.
        self.card = await model.card.remote()
        self.model_card = ModelCard(**self.card)  # its verdict rule, the one rule
        self.page = _render_page(self.card, auth=self._key is not None)
        self.review_page = _render_page(self.card, self._key is not None, "review.html")
        self._openapi: dict[str, dict] = {}  # by the prefix the app is served under
        self.decoding = asyncio.Semaphore(config.max_concurrent_decodes)
        self.requests = Counter(
            "detector_requests", "POST /v1/detect requests by outcome", tag_keys=("status", "code")
        )
        self.latency = Histogram(
            "detector_request_latency_s", "POST /v1/detect latency (seconds)",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("status",),
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    async def review_page_(self) -> HTMLResponse:
        return HTMLResponse(self.review_page)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_(self, request: Request) -> JSONResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        if root not in self._openapi:
            self._openapi[root] = openapi_document(request.app, root, self._key is not None)
        return JSONResponse(self._openapi[root])

    @app.get("/docs", include_in_schema=False)
    async def docs_(self, request: Request) -> HTMLResponse:
        from fastapi.openapi.docs import get_swagger_ui_html

        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=request.app.title)

    @app.get("/healthz", response_model=api.Health, responses=api.errors(503))
    async def healthz(self) -> JSONResponse:
        """200 when the model deployment answers within 5 s."""
        try:
            model_id = await asyncio.wait_for(self.model.ping.remote(), timeout=5.0)
        except Exception as exc:
            return error_response(503, "unavailable", f"model not answering: {type(exc).__name__}")
        return _json(api.Health(status="ok", model=model_id))

    @app.get("/v1/model", response_model=api.ModelInfo, responses=api.errors(401),
             dependencies=BEARER)
    async def model_card(self, request: Request) -> JSONResponse:
        """What is loaded: the card of the model version that scores every request."""
        self._authorize(request)
        return _json(api.ModelInfo(**{k: self.card.get(k) for k in api.ModelInfo.model_fields}))

    @app.post("/v1/detect", response_model=api.DetectResult, openapi_extra=DETECT_DOC,
              responses={200: {"headers": BATCH_HEADER},
                         **api.errors(400, 401, 413, 415, 422, 503)},
              dependencies=BEARER)
    async def detect(self, request: Request) -> JSONResponse:
        """One image or video (raw body or multipart `file`) -> `{score_ai, verdict,
        threshold, ...}`; a video's answer adds its frames' scores."""
        start = time.perf_counter()
        outcome = _Outcome()
        try:
            response = _json(await self._detect(request, outcome),
                             headers={"X-Batch-Size": str(outcome.batch_size)})
        except ApiError as err:
            outcome.code, response = err.code, err.response()
        except Exception as exc:
            log.error("detect failed: %s", type(exc).__name__, exc_info=exc)
            outcome.code = "internal"
            response = error_response(500, "internal", "internal error; see the server logs")
        self._record(response.status_code, outcome, time.perf_counter() - start)
        return response

    async def _detect(self, request: Request, outcome: _Outcome) -> api.DetectResult:
        self._authorize(request)
        check = _flag(request.query_params.get("consistency"), "consistency")
        explain = _flag(request.query_params.get("explain"), "explain")
        start = time.perf_counter()
        blob = await self._read_upload(request)
        outcome.bytes = len(blob)
        start = outcome.lap("read", start)
        if video.looks_like_video(blob[:16]):
            if check or explain:
                raise ApiError(422, "invalid-request", "consistency and explain are for "
                               "images; a video is scored by its sampled frames")
            return await self._detect_video(blob, outcome, start)
        if len(blob) > self.config.max_body_bytes:  # a multipart body may hold a video
            raise ApiError(413, "too-large", f"{len(blob)} bytes exceeds the image limit of "
                           f"{self.config.max_body_bytes}")
        async with self.decoding:  # more wait here, holding only their bytes
            pixels, info = await asyncio.to_thread(self._decode, blob)
        start = outcome.lap("decode", start)
        evidence = await asyncio.to_thread(provenance.inspect, blob)
        flag = familiarity.check(self.model_card.domain, info.format, info.width, info.height)
        unlike_real = (await asyncio.to_thread(residual.check, self.model_card.domain,
                                               pixels[None]))[0]
        evidence += [f for f in (flag, unlike_real) if f]
        start = outcome.lap("provenance", start)
        score, head, outcome.batch_size = await self._score(pixels)
        if check:  # the copies join the model's batches like any other request
            copies = await asyncio.to_thread(consistency.variants, pixels)
            copy_scores = [s for s, _, _ in await asyncio.gather(*map(self._score, copies))]
            flip = consistency.finding(functools.partial(classify_for, self.model_card), score,
                                       copy_scores)
            evidence = evidence + ([flip] if flip else [])
        start = outcome.lap("model", start)
        explained = {}  # only when asked: the answer's fields are otherwise as they were
        if explain:  # from the pixels just scored, by the replica that holds the model
            heat, method = await self._call(self.model.explain.remote(pixels))
            overlay = await asyncio.to_thread(overlay_png, blob, heat)
            explained = {"heatmap_png": base64.b64encode(overlay).decode("ascii"),
                         "explanation": method}
            outcome.lap("explain", start)
        verdict, decided_by = decide_for(self.model_card, score, evidence)
        named = attribute_for(self.model_card, verdict, evidence, head)
        return api.DetectResult(
            score_ai=score, verdict=verdict, decided_by=decided_by,
            evidence=[api.EvidenceItem(**e.to_dict()) for e in evidence],
            threshold=self.card["threshold"], model=f"{self.card['name']}@{self.card['id']}",
            format=info.format, width=info.width, height=info.height,
            generator=named.generator, generator_decided_by=named.decided_by,
            generator_scores=None if named.scores is None else
            [api.GeneratorScore(**s) for s in named.scores],
            **explained,
        )

    async def _detect_video(self, blob: bytes, outcome: _Outcome, start: float
                            ) -> api.DetectResult:
        """A video: frames sampled here, scored in one call by the Model replicas, decided
        by the video rule predict and scans apply (`detector.verdicts.video`)."""
        async with self.decoding:  # one video's frames at a time per permit
            sampled = await asyncio.to_thread(self._sample, blob)
        start = outcome.lap("decode", start)
        evidence = await asyncio.to_thread(provenance.inspect, blob)
        start = outcome.lap("provenance", start)
        answer = await self._call(self.model.score_pixels.remote(sampled.pixels))
        outcome.batch_size = len(sampled.pixels)
        outcome.lap("model", start)
        scores = np.asarray(answer["scores"]).reshape(-1)
        decided = decide_video(self.model_card, scores, sampled.times_s, answer["heads"],
                               evidence)
        return api.DetectResult(  # evidence and generator scores validate into their models
            **sampled.fields(), **decided.fields(), media="video",
            threshold=self.card["threshold"], model=f"{self.card['name']}@{self.card['id']}")

    def _sample(self, blob: bytes) -> video.Frames:
        limits = video.VideoLimits(max_bytes=self.config.max_video_bytes)
        try:
            return video.sample_frames(blob, self.card["image_size"],
                                       self.config.video_frames, limits)
        except video.VideoError as err:
            raise ApiError(413 if err.code == "too-large" else 400, err.code,
                           err.detail) from None

    @app.post("/v1/scans", status_code=202, response_model=api.ScanStarted,
              openapi_extra=SCAN_DOC, responses=api.errors(401, 403, 413, 422, 429),
              dependencies=BEARER)
    async def start_scan(self, request: Request) -> JSONResponse:
        """Start a bucket scan `{source, output}` through this deployment -> 202 `{id}`."""
        try:
            self._authorize(request)
            asked = api.ScanRequest.model_validate_json(
                await read_bounded(request, MAX_SCAN_REQUEST_BYTES))
        except ApiError as err:
            return err.response()
        except ValidationError as err:
            return error_response(422, "invalid-request", 'send JSON {"source": URI, '
                                  '"output": URI of the report prefix}: '
                                  + "; ".join(e["msg"] for e in err.errors())[:300])
        for uri in (asked.source, asked.output):
            if not scan_service.allowed(uri, self.config.scan_allow):
                return error_response(403, "forbidden", f"{uri} is outside the scan allow-list")
        try:
            scan_id = await asyncio.to_thread(
                scan_service.start_scan, asked.source, asked.output, self.config.model_uri,
                serve.get_replica_context().app_name, self.config.max_running_scans,
                self.config.keep_finished_scans_s,
            )
        except scan_service.TooManyScans as busy:
            return error_response(429, "too-many-scans", str(busy),
                                  headers={"Retry-After": "60"})
        return _json(api.ScanStarted(id=scan_id, status="running",
                                     status_url=f"/v1/scans/{scan_id}"), status=202)

    @app.post("/v1/labels", status_code=201, response_model=api.LabelsStored,
              responses=api.errors(401, 403, 404, 413, 422), dependencies=BEARER)
    async def post_labels(self, request: Request) -> JSONResponse:
        """Store a batch of reviewers' labels `{labels: [{uri or sha256, label, ...}]}`
        as one new part of the app's labels dataset -> 201 `{batch, labels}`."""
        try:
            self._authorize(request)
            asked = api.LabelBatch.model_validate_json(
                await read_bounded(request, MAX_LABELS_REQUEST_BYTES))
            stored = await asyncio.to_thread(label_store.store, asked, self.config)
        except ApiError as err:
            return err.response()
        except ValidationError as err:
            return error_response(422, "invalid-request", 'send JSON {"labels": [{"uri" or '
                                  '"sha256", "label": "real" | "ai-generated", ...}]}: '
                                  + "; ".join(e["msg"] for e in err.errors())[:300])
        except label_store.Refused as refused:
            return error_response(refused.status, refused.code, refused.detail)
        return _json(stored, status=201)

    @app.get("/v1/scans", response_model=api.ScanList, responses=api.errors(401),
             dependencies=BEARER)
    async def list_scans(self, request: Request) -> JSONResponse:
        """Every scan started over HTTP that is running or kept after finishing."""
        try:
            self._authorize(request)
        except ApiError as err:
            return err.response()
        states = await asyncio.to_thread(scan_service.list_scans)
        return _json(api.ScanList(scans=[api.ScanStatus(**s) for s in states]))

    @app.get("/v1/scans/{scan_id}", response_model=api.ScanStatus,
             responses=api.errors(401, 404, 503), dependencies=BEARER)
    async def get_scan(self, scan_id: str, request: Request) -> JSONResponse:
        """Status, progress counts and, when finished, the summary of a scan."""
        try:
            self._authorize(request)
        except ApiError as err:
            return err.response()
        try:
            state = await asyncio.to_thread(scan_service.scan_status, scan_id)
        except scan_service.ScanStarting:
            return error_response(503, "starting", f"scan {scan_id} is still starting; "
                                  "retry shortly", {"Retry-After": "5"})
        if state is None:
            return error_response(404, "not-found", f"no scan {scan_id}")
        return _json(api.ScanStatus(**state))

    @app.get("/v1/scans/{scan_id}/review", response_model=api.ReviewPage,
             responses=api.errors(401, 404, 409, 422, 503), dependencies=BEARER)
    async def review_scan(
        self, request: Request, scan_id: str, offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=500),
    ) -> JSONResponse:
        """One page of a scan's rows worth a human's time: `uncertain` rows, AI verdicts of
        the classifier alone, near-duplicate groups with mixed verdicts."""
        self._authorize(request)
        return await self._review(await self._report_of(scan_id), offset, limit)

    @app.get("/v1/review", response_model=api.ReviewPage,
             responses=api.errors(401, 403, 404, 422), dependencies=BEARER)
    async def review_report(
        self, request: Request,
        report: str = Query(max_length=2048, description="a committed scan report's prefix "
                            "under the scan allow-list"),
        offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500),
    ) -> JSONResponse:
        """As GET /v1/scans/{scan_id}/review, for any committed report (a scan started
        elsewhere, or one no longer kept)."""
        self._authorize(request)
        if not scan_service.allowed(report, self.config.scan_allow):
            raise ApiError(403, "forbidden", f"{report} is outside the scan allow-list")
        return await self._review(report, offset, limit)

    async def _review(self, out: str, offset: int, limit: int) -> JSONResponse:
        try:
            page = await asyncio.to_thread(review.review_page, out, offset, limit)
        except FileNotFoundError:
            raise ApiError(404, "not-found", f"no committed scan report at {out}") from None
        return _json(api.ReviewPage(**page, generators=self.card.get("generators") or []))

    @app.get("/v1/review/image", response_class=Response,
             responses={200: {"description": "a PNG thumbnail, or the original's bytes as "
                                         "their image type",
                              "content": {"image/*": {"schema": BINARY}}},
                        **api.errors(401, 403, 404, 413, 422)}, dependencies=BEARER)
    async def review_image(
        self, request: Request, uri: str = Query(max_length=2048),
        original: bool = Query(False, description="the object's own bytes instead of a "
                               "thumbnail of the square the model scored"),
    ) -> Response:
        """An image or video under the scan allow-list, for the review page: a PNG
        thumbnail (a video's middle frame), or its original bytes."""
        self._authorize(request)
        if not scan_service.allowed(uri, self.config.scan_allow):
            raise ApiError(403, "forbidden", f"{uri} is outside the scan allow-list")
        limit = max(self.config.max_body_bytes, self.config.max_video_bytes)
        try:
            blob = await asyncio.to_thread(review.read_image, uri, limit)
        except FileNotFoundError:
            raise ApiError(404, "not-found", f"no object at {uri}") from None
        except review.TooLarge as err:
            raise ApiError(413, "too-large", str(err)) from None
        if original:
            return Response(blob, media_type=review.media_type(blob))
        try:
            png = await asyncio.to_thread(
                review.thumbnail, blob, self.config.max_body_bytes, self.config.max_pixels,
                video.VideoLimits(max_bytes=self.config.max_video_bytes))
        except preprocess.ImageError as err:
            raise ApiError(413 if err.code == "too-large" else 422, err.code,
                           err.detail) from None
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    async def _report_of(self, scan: str) -> str:
        """The report prefix of a scan this app started, once it has succeeded."""
        try:
            state = await asyncio.to_thread(scan_service.scan_status, scan)
        except scan_service.ScanStarting:
            raise ApiError(503, "starting", f"scan {scan} is still starting; retry shortly",
                           headers={"Retry-After": "5"}) from None
        if state is None:
            raise ApiError(404, "not-found", f"no scan {scan} (finished scans are kept "
                           f"{self.config.keep_finished_scans_s:g} s; GET /v1/review?report=URI "
                           "reads any committed report)")
        if state["status"] != "succeeded":
            raise ApiError(409, "not-finished", f"scan {scan} is {state['status']}")
        return state["output"]

    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Constant-time compare; neither key ever reaches a log line.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self._key):
            raise ApiError(401, "unauthorized", "missing or wrong API key (Authorization: "
                           "Bearer <key>)", headers={"WWW-Authenticate": "Bearer"})

    async def _read_upload(self, request: Request) -> bytes:
        """The uploaded file, within its limit: a video/* body's is `max_video_bytes`, an
        image's `max_body_bytes`; a multipart body may be either until it is read."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        images, videos = self.config.max_body_bytes, self.config.max_video_bytes
        if kind == "multipart/form-data":
            body = await read_bounded(request, max(images, videos) + MULTIPART_OVERHEAD)
            return await _multipart_file(request, body)
        if kind.startswith("video/"):
            return await read_bounded(request, videos)
        if kind and not kind.startswith("image/") and kind not in RAW_TYPES:
            raise ApiError(415, "unsupported-media-type", f"{kind} is not accepted; send "
                           "image/*, video/*, application/octet-stream or "
                           "multipart/form-data")
        return await read_bounded(request, images)

    def _decode(self, blob: bytes) -> tuple[np.ndarray, preprocess.ImageInfo]:
        try:
            return preprocess.load_image(
                blob, self.card["image_size"], max_bytes=self.config.max_body_bytes,
                max_pixels=self.config.max_pixels,
            )
        except preprocess.ImageError as err:
            status = {"too-large": 413, "unsupported-format": 415}.get(err.code, 400)
            raise ApiError(status, err.code, err.detail) from None

    async def _score(self, pixels: np.ndarray) -> tuple[float, np.ndarray | None, int]:
        return await self._call(self.model.score.remote(pixels))

    async def _call(self, response: Any) -> Any:
        """Await a Model deployment call; overload and unavailability are 503s."""
        try:
            return await response
        except BackPressureError:
            raise ApiError(503, "overloaded", "too many requests queued; retry shortly",
                           headers={"Retry-After": "1"}) from None
        except (DeploymentUnavailableError, RayActorError) as exc:
            raise ApiError(503, "unavailable", f"model unavailable: {type(exc).__name__}",
                           headers={"Retry-After": "5"}) from None

    def _record(self, status: int, outcome: _Outcome, seconds: float) -> None:
        self.requests.inc(tags={"status": str(status), "code": outcome.code})
        self.latency.observe(seconds, tags={"status": str(status)})
        # One structured line per request; sizes and codes only, never bytes or keys.
        log.info(json.dumps({
            "event": "detect", "status": status, "code": outcome.code,
            "latency_ms": round(seconds * 1000, 2), "batch_size": outcome.batch_size,
            "bytes": outcome.bytes, **{f"{k}_ms": v for k, v in outcome.stages_ms.items()},
        }))


# ---------------------------------------------------------------------------------------------
# Building and running
# ---------------------------------------------------------------------------------------------


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application builder (`import_path: detector.serving:build_app`)."""
    return build_app_from_config(ServeConfig.from_args(dict(args)))


def build_app_from_config(
    config: ServeConfig, env: dict[str, str] | None = None, api_key: str | None = None
) -> serve.Application:
    """Bind Ingress -> Model with `config`.

    `env` is set in the replicas' environment (through runtime_env, which Ray logs: no
    secrets). `api_key` overrides the `api_key_env` variable and travels as a constructor
    argument, which is never logged.
    """
    # Pinned here, once: every replica, started now or by autoscaling later, loads this one
    # version, so the Ingress's card (threshold, id) is always that of the model that scores.
    # Moving to a new version is a redeploy (see "Model versions" in the README).
    config = dataclasses.replace(config, model_uri=_pin(config.model_uri))
    runtime_env = {"runtime_env": {"env_vars": dict(env)}} if env else {}
    model = Model.options(
        autoscaling_config=_autoscaling(config),
        max_ongoing_requests=config.model_max_ongoing(),
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                           **runtime_env},
    ).bind(config)
    return Ingress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress_num_cpus, **runtime_env},
    ).bind(model, config, api_key)


def _pin(model_uri: str) -> str:
    """The version `model_uri` names now. No artifact there fails the deploy; storage that
    cannot be reached from where the app is built (a config check on a laptop) leaves the
    name for each replica to resolve when it starts, with a warning."""
    try:
        return resolve(model_uri)
    except FileNotFoundError:
        raise
    except OSError as exc:
        log.warning("could not resolve %s where the app is built (%s): replicas resolve it "
                    "when they start, so a version published meanwhile may mix in",
                    model_uri, exc)
        return model_uri


def _autoscaling(config: ServeConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "upscale_delay_s": config.upscale_delay_s,
        "downscale_delay_s": config.downscale_delay_s,
        "look_back_period_s": config.look_back_period_s,
    }
    if config.metrics_interval_s is not None:  # deprecated in Serve, but still the knob
        settings["metrics_interval_s"] = config.metrics_interval_s
    return settings


def run(
    config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True
) -> None:
    """Start Serve on host:port with this app (what `detector serve` calls).

    The API key, when set in this process, is handed to the ingress explicitly: on an
    already-running cluster the replicas would not inherit this shell's environment.
    """
    key = os.environ.get(config.api_key_env) or None
    config = dataclasses.replace(config, model_uri=resolve(config.model_uri))  # say which

    def start() -> None:
        console.quiet_ray_loggers()  # Serve's driver-side loggers (set up on import)...
        serve.start(http_options={"host": host, "port": port})
        console.quiet_ray_loggers()  # ...and those serve.start adds
        serve.run(build_app_from_config(config, api_key=key), name=APP_NAME, route_prefix="/")
        print(f"detector serving {config.model_uri} on http://{host}:{port}/ (docs at /docs)",
              flush=True)

    if not blocking:
        start()
        return

    def stop(signum, frame):  # SIGTERM (kubectl, systemd, docker stop) as Ctrl-C
        raise KeyboardInterrupt

    # Before anything starts: a SIGTERM while the app deploys stops it just the same.
    signal.signal(signal.SIGTERM, stop)
    try:
        start()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
