"""Typed settings for every job, in one place: defaults, CLI flags and saved configs.

Each dataclass field becomes a `--flag` (underscores -> dashes) with its default and help
text, so the CLI, `jobs/` entry points and KubeRay manifests cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from detector.io.preprocess import DEFAULT_MAX_PIXELS
from detector.io.video import DEFAULT_FRAMES, VideoLimits

BACKENDS = ("auto", "keras", "openvino", "onnxruntime")  # see detector.model.runtimes
PRECISIONS = ("float32", "bfloat16", "int8")
MAX_AUC_DROP = 0.005  # the largest test ROC AUC loss an int8 export may have
BACKEND_HELP = ("auto (OpenVINO on CPU when the artifact has model.onnx, ONNX Runtime's CUDA "
                "provider or Keras on a GPU, else Keras), keras, openvino or onnxruntime")
PRECISION_HELP = ("float32; bfloat16 (CPUs with AMX/AVX512-BF16: OpenVINO ~5x, Keras ~1.6x "
                  "faster; scores move by about a hundredth); int8 (OpenVINO, needs "
                  "`detector train --int8` or `detector export --int8`)")
# Perceptual-hash distance (of 64 bits) within which images are near-duplicates: copies
# at 48 px measured 0-6 apart, other scenes 26-34 (detector.data.duplicates).
DEFAULT_DISTANCE = 6
GATE_TOLERANCE = 0.01  # the largest drop in a slice's accuracy or TPR@1%FPR a gate allows


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


def _req(help: str, **extra: Any) -> Any:
    return field(metadata={"help": help, "required": True, **extra})


@dataclass(frozen=True)
class PrepareConfig:
    """`detector prepare`: object storage -> Parquet training shards."""

    out: str = _req("output URI for train/, val/, test/ and manifest.json")
    real: tuple[str, ...] = _opt((), "URI(s) of real photographs (s3://, file:// or path); "
                                 "NAME=URI names a source, for slicing")
    fake: tuple[str, ...] = _opt((), "URI(s) of AI-generated images; NAME=URI names the "
                                 "generator (e.g. sdxl=s3://b/sdxl/); an unnamed URI's "
                                 "generator is unknown")
    labels: str | None = _opt(None, "URI of a labels dataset (`detector label`, POST "
                              "/v1/labels): every labelled image joins the set, read from its "
                              "URI, with source `review`; a label given by sha256 alone "
                              "relabels the --base image with those bytes")
    base: str | None = _opt(None, "URI of prepared shards to start from: their images are "
                            "copied in (a label replaces an image's base row), and their "
                            "size, seed, split and near-duplicate distance apply")
    per_class: int | None = _opt(None, "sample at most N images per class (deterministic)")
    split: tuple[float, ...] = _opt((0.7, 0.15, 0.15), "train,val,test fractions")
    seed: int = _opt(42, "seed for sampling and the split")
    image_size: int = _opt(224, "pixel size of the stored square images")
    rows_per_file: int = _opt(256, "rows per Parquet part (at most); a part is built in one "
                              "task's memory: 256 rows of 224 px are 38 MB of pixels")
    near_duplicates: int = _opt(DEFAULT_DISTANCE, "keep images whose perceptual hashes differ "
                                "in at most this many of 64 bits in one split (-1: byte hash "
                                "only)")


@dataclass(frozen=True)
class TrainConfig:
    """`detector train`: data-parallel training on Ray Train, then evaluation."""

    data: str = _req("URI of prepared shards (output of `detector prepare`)")
    model: tuple[str, ...] = _req("model name(s), e.g. resnet50v2,vit; trained one after another")
    out: str = _req("output URI; each model goes to OUT/<model>/")
    workers: int = _opt(2, "Ray Train workers (data-parallel replicas)")
    gpus_per_worker: float = _opt(0.0, "GPUs per worker (0 = CPU training)")
    cpus_per_worker: float = _opt(1.0, "CPUs per worker")
    epochs: int = _opt(20, "maximum epochs", fine_tune=5)
    batch_size: int = _opt(32, "global batch size (split across workers)")
    lr: float = _opt(1e-4, "Adam learning rate", fine_tune=1e-5)
    patience: int = _opt(3, "early-stopping patience on validation loss (epochs)")
    lr_patience: int = _opt(2, "reduce-LR-on-plateau patience (epochs); the LR halves")
    image_size: int | None = _opt(None, "input size; default: the shards' size")
    weights: str = _opt("imagenet", "resnet50v2 base weights: imagenet | none | PATH/URI")
    augment: str = _opt("none", "training augmentation: none | robust", choices=("none", "robust"))
    review_weight: int = _opt(1, "times each reviewed image (source `review`, from --labels) "
                              "is seen per epoch: a few dozen corrections among thousands of "
                              "base images otherwise barely move the weights", fine_tune=4)
    feature_cache: bool = _opt(True, "for models with a frozen base (resnet50v2): compute the "
                               "base's features once (a Ray Data pass, kept beside the shards "
                               "and reused by runs with the same data and settings) and train "
                               "the head on them; --no-feature-cache recomputes the base "
                               "every epoch")
    threshold_policy: str = _opt("balanced", "how the decision threshold is chosen on the "
                                 "validation split: balanced (max TPR - FPR) or target-fpr:X "
                                 "(the most AI images caught while at most a share X of real "
                                 "photos are flagged, e.g. target-fpr:0.01)")
    mixed_precision: bool = _opt(False, "compute in float16 (with loss scaling) on GPUs, or "
                                 "bfloat16 on CPUs with AMX/AVX512-BF16; weights and the "
                                 "published model stay float32")
    views: int = _opt(4, "with --augment robust and the feature cache: augmented views cached "
                      "per training image (epoch e trains on view e mod VIEWS)")
    int8: bool = _opt(False, "also publish an OpenVINO int8 export (NNCF, calibrated on the "
                      "validation split); left out, with a warning, when its test ROC AUC "
                      f"drops more than {MAX_AUC_DROP}")
    resume: bool = _opt(False, "continue from the last checkpoint under OUT")
    init_from: str | None = _opt(None, "fine-tune: start from this published version's "
                                 "weights (OUT/<name>/<id>, or OUT/<name> for its latest), same "
                                 "model, size and generators. The new version records it as "
                                 "its parent and does not move `latest` where one exists: "
                                 "`detector compare` and `detector promote` decide that")
    max_failures: int = _opt(2, "worker failures Ray Train recovers from (from checkpoint)")
    max_steps_per_epoch: int | None = _opt(None, "cap steps per epoch (smoke tests)")
    seed: int = _opt(42, "random seed")


@dataclass(frozen=True)
class RetrainConfig:
    """`detector retrain`: reviewers' labels -> new shards -> a fine-tune -> the gate ->
    promotion when the gate passes."""

    model: str = _req("the model name to improve, OUT/<name>: its latest is the baseline "
                      "and the fine-tune's parent; the candidate is published beside it")
    labels: str = _req("URI of the labels dataset (`detector label`, POST /v1/labels)")
    shards: str = _req("output URI of the new shard set: the base plus the labelled images")
    base: str | None = _opt(None, "shards to build on (default: those the baseline was "
                            "trained on, from its card)")
    epochs: int = _opt(5, "fine-tune epochs")
    lr: float = _opt(1e-5, "fine-tune learning rate")
    review_weight: int = _opt(4, "times each reviewed image is seen per fine-tune epoch")
    workers: int = _opt(2, "Ray Train workers")
    cpus_per_worker: float = _opt(1.0, "CPUs per worker")
    gpus_per_worker: float = _opt(0.0, "GPUs per worker")
    tolerance: float = _opt(GATE_TOLERANCE, "the gate: the largest loss of accuracy or "
                            "TPR@1%FPR a slice may show (see `detector compare`)")
    promote: bool = _opt(True, "move the name's latest to the candidate when the gate passes "
                         "(--no-promote: fine-tune and compare only)")
    report: str | None = _opt(None, "URI of a folder for compare.md, compare.json and "
                              "retrain.json")
    backend: str = _opt("auto", f"scoring runtime of the comparison: {BACKEND_HELP}",
                        choices=BACKENDS)


@dataclass(frozen=True, kw_only=True)
class ScanConfig:
    """`detector scan`: every image under a prefix -> one Parquet report row each."""

    source: str = _opt("", "URI prefix to scan (s3://bucket/prefix, file:// or path)",
                       positional=True)
    model: str = _req("model artifact URI")
    out: str = _req("report prefix: Parquet parts + _manifest.json, committed last")
    manifest: str | None = _opt(None, "scan the keys listed in this CSV/Parquet file or "
                                "prefix of files (columns uri, or bucket+key; optional "
                                "size, etag), e.g. an S3 Inventory report, instead of "
                                "listing SOURCE")
    include: tuple[str, ...] = _opt((), "file-name globs to select by name instead of by "
                                    "content (default: every object is read and identified "
                                    "by its bytes, except known non-image extensions), "
                                    "case-insensitive")
    exclude: tuple[str, ...] = _opt((), "file-name globs never to read, case-insensitive")
    explain_selection: bool = _opt(False, "print the first few objects not read, by reason")
    via: str = _opt("auto", "scoring path: serve (shared Serve replicas, which must serve "
                    "--model), data (own actor pool) or auto (serve when the running "
                    "Serve app serves --model)", choices=("auto", "serve", "data"))
    batch_size: int = _opt(32, "images per forward pass")
    backend: str = _opt("auto", "inference runtime for --via data: " + BACKEND_HELP,
                        choices=BACKENDS)
    precision: str = _opt("float32", "inference precision for --via data: " + PRECISION_HELP,
                          choices=PRECISIONS)
    resume: bool = _opt(False, "keep the parts of an earlier or interrupted scan into OUT and "
                        "reuse rows whose (uri, etag, model id, threshold) all match and "
                        "that were written by this report format and provenance rules")
    threshold: float | None = _opt(None, "decision threshold (default: the model's own)")
    consistency: bool = _opt(False, "also score a JPEG-75 re-save and a 0.5x resize of every "
                             "image; uncertain where their verdicts disagree (3x the model "
                             "work; the evidence column says why)")
    group_duplicates: bool = _opt(False, "after the scan, group near-duplicates (pHash within "
                                  f"{DEFAULT_DISTANCE} bits): counts in the summary, "
                                  "OUT/_near_duplicates.parquet lists every grouped object")
    partition_size: int = _opt(65536, "objects per report part: the unit of commit, resume "
                               "and retry (and one Parquet row group)")
    listed_ahead: int | None = _opt(None, "most objects listed but not yet written, which "
                                    "bounds the driver's memory on any bucket (default: two "
                                    "partitions, at least 16,384)")
    actors: int | None = _opt(None, "most scoring actors for --via data (default: as many as "
                              "the cluster, autoscaling included, has room for)")
    cpus_per_actor: float | None = _opt(None, "CPUs per scoring actor (--via data); also the "
                                        "model's thread count (default: 2, less where no "
                                        "node has room for 2 and a decode task)")
    gpus_per_actor: float = _opt(0.0, "GPUs per scoring actor (--via data)")
    serve_app: str = _opt("detector", "name of the Serve application for --via serve")
    max_bytes: int = _opt(50 * 1024 * 1024, "objects larger than this are reported too-large")
    video: str = _opt("scan", "videos (found by name or by content): scan scores each by its "
                      "sampled frames, one row per video; skip counts those named as videos "
                      "as not read", choices=("scan", "skip"))
    video_frames: int = _opt(DEFAULT_FRAMES, "frames sampled per video, uniformly over its "
                             "duration")
    video_max_bytes: int = _opt(VideoLimits.max_bytes, "videos larger than this are "
                                "reported too-large")
    stall_timeout: float = _opt(600.0, "fail when nothing could be scheduled for this many "
                                "seconds and no node is being added")

    def __post_init__(self) -> None:
        if not self.source and not self.manifest:
            raise ValueError("give a SOURCE prefix to scan, or --manifest")
        if self.partition_size < 1:
            raise ValueError("--partition-size must be at least 1")
        if self.listed_ahead is not None and self.listed_ahead < 1:
            raise ValueError("--listed-ahead must be at least 1")
        if self.video_frames < 1:
            raise ValueError("--video-frames must be at least 1")


@dataclass(frozen=True)
class ServeConfig:
    """`detector.serving:build_app`: everything the Serve app accepts; every field is also a
    `key=value` for `serve run` (defaults for one machine; `deploy.SERVE` is the cluster's)."""

    model_uri: str = ""
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 16.0  # per Model replica: about half a full batch
    max_batch_size: int = 32
    backend: str = "auto"  # see detector.model.runtimes
    precision: str = "float32"
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int | None = None  # per Model replica; see model_max_ongoing
    max_queued_requests: int = 256  # per caller; beyond it the ingress answers 503
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float | None = None  # None keeps Serve's default (10 s)
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Videos (a video/* body, or video bytes): their own size limit, and frames scored each
    max_video_bytes: int = 100 * 1024 * 1024
    video_frames: int = DEFAULT_FRAMES
    api_key_env: str = "DETECTOR_API_KEY"
    num_cpus: float = 2.0  # per Model replica; on CPU also its model's thread count
    num_gpus: float = 0.0  # per Model replica
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.5  # decoding happens here
    # Per ingress replica; each decode peaks under 10 bytes per pixel of max_pixels
    # (~480 MiB at 50 MP), so this bounds the ingress's decode memory.
    max_concurrent_decodes: int = 4
    ingress_max_ongoing_requests: int = 256
    # URI prefixes POST /v1/scans may read from and write to; empty = scans are refused.
    scan_allow: tuple[str, ...] = ()
    max_running_scans: int = 2  # more POST /v1/scans get 429 until one finishes
    keep_finished_scans_s: float = 3600.0  # then GET /v1/scans/{id} says 404; reports stay
    # Where POST /v1/labels appends reviewers' labels (detector.data.labels); empty = off.
    # A labelled URI must lie under scan_allow and exist.
    labels_uri: str = ""

    def model_max_ongoing(self) -> int:
        # A replica must hold one full batch plus the next one filling up; and never so few
        # that callers spin in the router's back-off instead of queueing at the replica.
        return self.max_ongoing_requests or max(2 * self.max_batch_size, 16)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeConfig:
        """`build_app` args -> ServeConfig. `serve run key=value` passes strings: coerced."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ValueError(f"unknown serve args {unknown}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        config = cls(**{key: _coerce(value, hints[key]) for key, value in args.items()})
        if not config.model_uri:
            raise ValueError("model_uri is required (e.g. model_uri=s3://bucket/models/vit)")
        if config.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
        if config.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
        return config

    def to_args(self) -> dict[str, Any]:
        """The `build_app` args that give back this config (YAML-safe: lists, no Nones)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items() if value is not None}


def _coerce(value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) is tuple:  # "a,b" from `serve run`, a list from YAML
        parts = value.split(",") if isinstance(value, str) else value
        return tuple(str(p).strip() for p in parts if str(p).strip())
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        return None if type(None) in typing.get_args(hint) else value
    return kinds[0](value) if isinstance(value, str) else value


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--flag` per dataclass field (tuple fields take a comma list or repeats)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help", "").replace("%", "%%")  # argparse formats help with %
        required = meta.pop("required", False)
        if meta.pop("positional", False):
            optional = f.default is not dataclasses.MISSING
            parser.add_argument(f.name, help=help_text, metavar=f.name.upper(),
                                nargs="?" if optional else None,
                                default=f.default if optional else None)
            continue
        fine_tune = meta.pop("fine_tune", None)
        if f.default is not dataclasses.MISSING:
            shown = (",".join(map(str, f.default)) or "none") if isinstance(f.default, tuple) \
                else f.default
            also = "" if fine_tune is None else f"; {fine_tune} with --init-from"
            help_text = f"{help_text} (default: {shown}{also})"
        if kind is bool and f.default is True:  # on unless --no-FLAG
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif typing.get_origin(kind) is tuple:
            # extend: `--fake a=URI --fake b=URI` keeps both (store kept only the last).
            parser.add_argument(
                flag, nargs="+", action="extend", type=str, required=required,
                help=help_text, metavar=f.name.upper(),
            )
        else:
            parser.add_argument(flag, type=kind, required=required, help=help_text, **meta)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build `cls` from parsed flags; omitted flags keep the dataclass defaults (a
    fine-tune's own defaults with `--init-from`)."""
    hints = typing.get_type_hints(cls)
    values = {}
    fine_tuning = getattr(args, "init_from", None) is not None
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None and fine_tuning and "fine_tune" in f.metadata:
            value = f.metadata["fine_tune"]
        if value is None or (value is False and f.default is False):
            continue
        kind = _base_type(hints[f.name])
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            parts = [p for v in value for p in str(v).split(",") if p]
            value = tuple(item(p) for p in parts)
        values[f.name] = value
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _base_type(hint: Any) -> Any:
    """`int | None` -> int; other hints unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint
