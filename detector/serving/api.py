"""The HTTP contract as Pydantic models: what every route takes and answers.

The Serve ingress builds its JSON bodies through these models (so an answer that strays
from the contract fails on the server, not in a client) and FastAPI publishes them in the
OpenAPI document at /openapi.json, which schemathesis checks against the running app.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from detector.data.labels import LABEL_VALUES, MAX_BATCH, MAX_NOTE, SHA256

Verdict = Literal["ai-generated", "real", "uncertain"]


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(ApiModel):
    """Every 4xx and 5xx: a short machine-readable code and a human detail (never a trace)."""

    error: str = Field(examples=["truncated"])
    detail: str = Field(examples=["image file is truncated"])


class EvidenceItem(ApiModel):
    """One provenance, consistency or familiarity finding (see detector.verdicts)."""

    source: str = Field(description="c2pa | xmp | png-text | exif | stealth | metadata | "
                                    "consistency | familiarity")
    kind: str
    strength: Literal["strong", "weak", "info"]
    detail: str
    generator: str | None = Field(default=None, description="the tool this finding names")


class GeneratorScore(ApiModel):
    """One of the attribution head's top guesses: P(this generator | AI-generated)."""

    generator: str
    score: float = Field(ge=0, le=1)


class DetectResult(ApiModel):
    """The answer to POST /v1/detect."""

    score_ai: float = Field(ge=0, le=1, description="calibrated P(AI-generated)")
    verdict: Verdict
    decided_by: Literal["provenance", "classifier"]
    evidence: list[EvidenceItem]
    threshold: float = Field(ge=0, le=1)
    model: str = Field(description="name@version of the model that scored this image")
    format: str | None = Field(description="the decoded container format (PNG, JPEG, ...)")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    heatmap_png: str | None = Field(
        default=None, description="with ?explain=true: a base64 PNG of the image with where "
        "the model looked coloured over the square it scored")
    explanation: Literal["grad-cam", "attention-rollout"] | None = Field(
        default=None, description="how heatmap_png was made")
    generator: str | None = Field(
        default=None, description="which generator made it: a name, `unknown` (none the model "
        "can name with confidence), or null (a `real` verdict, or a model without an "
        "attribution head that no provenance names)")
    generator_scores: list[GeneratorScore] | None = Field(
        default=None, description="the attribution head's top 3 (null without a head, or "
        "for a `real` verdict)")
    generator_decided_by: Literal["provenance", "classifier"] | None = Field(
        default=None, description="provenance: a decisive finding names the tool")
    media: Literal["image", "video"] = Field(default="image")
    duration_s: float | None = Field(default=None, ge=0, description="videos: the duration "
                                     "the container states")
    frames_scored: int | None = Field(default=None, ge=1, description="videos: how many "
                                      "frames were sampled, uniformly over the duration")
    frame_scores: list[float] | None = Field(default=None, description="videos: each sampled "
                                             "frame's calibrated P(AI-generated)")
    frame_times_s: list[float] | None = Field(default=None, description="videos: when each "
                                              "sampled frame is shown")
    worst_frame_s: float | None = Field(default=None, description="videos: the time of the "
                                        "frame scored most likely AI")


class ModelInfo(ApiModel):
    """GET /v1/model: the card of the model version this app serves."""

    name: str
    id: str
    architecture: str
    image_size: int
    threshold: float
    uncertain_margin: float
    labels: dict[str, str]
    metrics: dict[str, Any]
    preprocess_version: int
    created_at: str
    calibration: dict[str, Any] = Field(default_factory=dict, description="how score_ai "
                                        "was calibrated on validation (method, ECE before "
                                        "and after); empty: never calibrated")
    domain: dict[str, Any] = Field(default_factory=dict, description="the formats and "
                                   "longer sides seen in training (outside: `uncertain`)")
    generators: list[str] = Field(default_factory=list, description="the attribution "
                                  "head's classes (empty: no head)")
    attribution: dict[str, Any] = Field(default_factory=dict, description="its open-set "
                                        "rule, fitted on validation")
    parent: dict[str, Any] = Field(default_factory=dict, description="the version this "
                                   "one was fine-tuned from (id, name, uri); empty: trained "
                                   "from scratch")


class Health(ApiModel):
    status: Literal["ok"]
    model: str = Field(description="name@version of the model answering")


class LabelItem(ApiModel):
    """One reviewer's decision on one image, named by its URI or the sha256 of its bytes."""

    uri: str | None = Field(default=None, max_length=2048,
                            examples=["s3://bucket/images/cat.jpg"])
    sha256: str | None = Field(default=None, pattern=SHA256.pattern,
                               description="of the image's bytes, lowercase hex")
    label: Literal[LABEL_VALUES]  # type: ignore[valid-type]
    generator: str | None = Field(default=None, max_length=200,
                                  description="which generator made it, if known")
    note: str | None = Field(default=None, max_length=MAX_NOTE)


class LabelBatch(ApiModel):
    """POST /v1/labels: one batch, stored whole or not at all."""

    labels: list[LabelItem] = Field(min_length=1, max_length=MAX_BATCH)
    reviewer: str | None = Field(default=None, min_length=1, max_length=200,
                                 description="who decided (default: `api-key`)")


class LabelsStored(ApiModel):
    batch: str = Field(description="the labels dataset part this batch was written to")
    labels: int


class ScanRequest(ApiModel):
    """POST /v1/scans: both URIs must lie under the app's `scan_allow` prefixes."""

    source: str = Field(min_length=1, max_length=2048, examples=["s3://bucket/images/"])
    output: str = Field(min_length=1, max_length=2048, examples=["s3://bucket/reports/"])


class ScanStarted(ApiModel):
    id: str
    status: Literal["running"]
    status_url: str


class ScanStatus(ApiModel):
    """A scan started over HTTP, while it runs and after (kept `keep_finished_scans_s`)."""

    id: str
    status: Literal["running", "succeeded", "failed"]
    source: str
    output: str
    started_at: str
    finished_at: str | None
    progress: dict[str, Any] | None = Field(description="counts so far, while running")
    summary: dict[str, Any] | None = Field(description="the scan's summary once succeeded")
    error: str | None


class ScanList(ApiModel):
    scans: list[ScanStatus]


class ReviewRow(ApiModel):
    """A report row worth a human's time, and why (see detector.serving.review)."""

    uri: str
    reason: Literal["uncertain", "classifier-ai", "mixed-group"]
    score_ai: float | None
    verdict: Verdict | None
    decided_by: Literal["provenance", "classifier"] | None
    evidence: list[EvidenceItem] | None
    generator: str | None
    generator_scores: list[GeneratorScore] | None
    media: Literal["image", "video"] | None = None
    format: str | None
    width: int | None
    height: int | None
    worst_frame_s: float | None = Field(default=None, description="videos: the time of "
                                        "the frame scored most likely AI")
    threshold: float | None
    model: str | None
    group: str | None = Field(default=None, description="its near-duplicate group (the "
                              "group's first URI), when the scan grouped near-duplicates")
    group_size: int | None = None
    group_verdicts: list[str] | None = Field(default=None, description="the verdicts its "
                                             "group's members got")


class ReviewPage(ApiModel):
    """GET /v1/review: one page of a committed report's rows worth reviewing."""

    report: str = Field(description="the report prefix")
    model: str | None = Field(description="name@id of the model that scanned")
    total: int = Field(ge=0, description="rows worth reviewing in the whole report")
    offset: int = Field(ge=0)
    by_reason: dict[str, int]
    rows: list[ReviewRow]
    generators: list[str] = Field(default_factory=list, description="the generators this "
                                  "app's model names (a reviewer's choices)")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry documenting these error statuses with the ErrorBody schema."""
    return {status: {"model": ErrorBody, "description": ERROR_MEANINGS[status]}
            for status in statuses}


ERROR_MEANINGS = {
    400: "undecodable image or malformed body",
    401: "missing or wrong API key (when the app has one)",
    403: "a URI outside the scan allow-list",
    404: "no such resource (or labels are not enabled on this app)",
    409: "the scan has not finished: its report is not committed yet",
    413: "too many bytes or pixels",
    415: "unsupported content type, or an image format refused on purpose (PSD, EPS, ...)",
    422: "a request that does not match this schema",
    429: "too many scans running; retry later",
    503: "overloaded, the model unavailable, or a scan still starting; retry later",
}
