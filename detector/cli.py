"""The `detector` console script. Subcommands mirror the Ray job entry points in jobs/."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from detector import config as cfg
from detector import console
from detector.selection import NotSelected

log = logging.getLogger("detector")


def main(argv: Sequence[str] | None = None, *, owns_process: bool | None = None) -> int:
    """The `detector` command. `owns_process` (default: when argv comes from the command
    line) lets it quiet the process's output (see console.py); a caller that only borrows
    it, such as a test or the demo's nested predict, keeps its own stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ banner is noise
    if argv is None if owns_process is None else owns_process:
        log_file = console.configure(args.command, getattr(args, "verbose", False))
        if log_file is not None and args.command in CHATTY_COMMANDS:
            print(f"(Ray and TensorFlow output: {log_file}; --verbose shows it here)",
                  file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return int(args.run(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as exc:  # the user's input, not a bug
        print(f"detector {args.command}: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detector", description="Tell real photographs from AI-generated images."
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and TensorFlow's output (default: a log file)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = commands.add_parser("sample", help="write a synthetic sample bucket")
    sample.add_argument("out", help="output URI (path, file:// or s3://)")
    sample.add_argument("--per-class", type=int, default=100)
    sample.add_argument("--size", type=int, default=None, help="exact square size (default: mix)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--biased", action="store_true", help="real=JPEG, fake=PNG, on purpose")
    sample.add_argument("--corrupt", type=int, default=0, help="bad files per class to add")
    sample.set_defaults(run=run_sample)

    prepare = commands.add_parser("prepare", help="object storage -> training shards (Ray Data)")
    cfg.add_arguments(prepare, cfg.PrepareConfig)
    prepare.set_defaults(run=run_prepare)

    train = commands.add_parser("train", help="train models data-parallel (Ray Train)")
    cfg.add_arguments(train, cfg.TrainConfig)
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a model artifact on shards")
    evaluate.add_argument("--model", required=True, help="model artifact URI")
    evaluate.add_argument("--data", required=True, help="prepared shards URI")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--out", help="directory URI for the report files")
    evaluate.add_argument("--recalibrate", action="store_true",
                          help="fit calibration, threshold and band again on --data's "
                          "validation split and publish them as a new version of the model "
                          "(same weights), moving OUT/<name>/latest.json")
    evaluate.add_argument("--threshold-policy", default=None,
                          help="with --recalibrate: balanced or target-fpr:X (default: the "
                          "model's own)")
    add_runtime_flags(evaluate)
    evaluate.set_defaults(run=run_evaluate)

    ensemble = commands.add_parser(
        "ensemble", help="combine trained models into one evaluated ensemble artifact")
    ensemble.add_argument("--models", required=True,
                          type=lambda text: [uri for uri in text.split(",") if uri],
                          help="member model URIs, comma-separated (each resolved to its "
                          "version now)")
    ensemble.add_argument("--weights", type=lambda text: [float(w) for w in text.split(",")],
                          help="one weight per member, comma-separated (default: equal)")
    ensemble.add_argument("--data", required=True, help="prepared shards URI: calibration, "
                          "threshold and band on val, evaluation on test")
    ensemble.add_argument("--out", required=True, help="models URI: publishes OUT/<name>/<id>/ "
                          "and adds a row to OUT/comparison.md")
    ensemble.add_argument("--name", default="ensemble")
    ensemble.add_argument("--threshold-policy", default="balanced",
                          help="balanced or target-fpr:X")
    add_runtime_flags(ensemble)
    ensemble.set_defaults(run=run_ensemble)

    export = commands.add_parser("export", help="add ONNX / OpenVINO int8 exports to a model")
    export.add_argument("--model", required=True, help="model artifact URI")
    export.add_argument("--int8", action="store_true",
                        help="also an OpenVINO int8 model, quantized by NNCF")
    export.add_argument("--data", default=None,
                        help="prepared shards for calibration (val) and parity (test); "
                        "default: the model's training data")
    export.add_argument("--max-auc-drop", type=float, default=cfg.MAX_AUC_DROP,
                        help="refuse an int8 model whose test ROC AUC drops more than this")
    export.set_defaults(run=run_export)

    predict = commands.add_parser("predict", help="score image files locally (no cluster)")
    predict.add_argument("--model", required=True, help="model artifact URI")
    predict.add_argument("images", nargs="+", help="image paths or URIs")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--consistency", action="store_true",
                         help="also score a JPEG-75 re-save and a 0.5x resize of each image; "
                         "uncertain when their verdicts disagree (3x the model work)")
    predict.add_argument("--explain", metavar="DIR",
                         help="write where the model looked (Grad-CAM / attention rollout) "
                         "over each image as DIR/<name>.explain.png")
    add_runtime_flags(predict)
    predict.set_defaults(run=run_predict)

    models = commands.add_parser(
        "models", help="list registered architectures, or (`models list OUT`) the trained "
        "versions under OUT")
    models.add_argument("action", nargs="?", choices=("list",), help="list trained versions")
    models.add_argument("out", nargs="?", help="training output URI (OUT, or OUT/<name>)")
    models.add_argument("--params", action="store_true", help="build each and count parameters")
    models.set_defaults(run=run_models)

    scan = commands.add_parser("scan", help="score every image under a prefix into a report")
    cfg.add_arguments(scan, cfg.ScanConfig)
    scan.set_defaults(run=run_scan)

    srv = commands.add_parser("serve", help="HTTP endpoint on Ray Serve (blocks until Ctrl-C)")
    srv.add_argument("--model", required=True, help="model artifact URI")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--min-replicas", type=int, default=cfg.ServeConfig.min_replicas)
    srv.add_argument("--max-replicas", type=int, default=cfg.ServeConfig.max_replicas)
    add_runtime_flags(srv)
    srv.add_argument("--scan-allow", nargs="*", default=[],
                     help="URI prefixes POST /v1/scans may read and write (default: none)")
    srv.set_defaults(run=run_serve)

    demo = commands.add_parser("demo", help="the whole product end to end on sample data")
    demo.add_argument("--workdir", default="demo-output")
    demo.set_defaults(run=run_demo)
    for command in commands.choices.values():  # `detector train --verbose ...` works too
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show Ray's and TensorFlow's output (default: a log file)")
    return parser


# Commands that start Ray or TensorFlow, so have chatter to hide.
CHATTY_COMMANDS = ("prepare", "train", "evaluate", "ensemble", "export", "predict", "scan",
                   "serve", "demo")


def run_sample(args: argparse.Namespace) -> int:
    from detector.sample import SampleSpec, write_sample

    spec = SampleSpec(per_class=args.per_class, size=args.size, seed=args.seed,
                      biased=args.biased, corrupt=args.corrupt)
    print(json.dumps(write_sample(args.out, spec), indent=2))
    return 0


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`) or a running local
    one; otherwise (or with RAY_ADDRESS=local) start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Quiet: workers' output stays in Ray's session logs (console.Relay carries the lines
    # meant for a person).
    options = {"logging_level": logging.WARNING, "log_to_driver": console.verbose()}
    console.quiet_ray_loggers()  # before init: it warns (token auth) through them
    if address and address != "local":  # "local": start one here, whatever else runs
        ray.init(**options)
    elif not address and _local_cluster_running():
        ray.init(address="auto", **options)
    else:
        # Ray CPUs are logical. Each Train worker holds one, and Ray Data's readers need
        # their own: on a 2-core laptop, 2 workers would otherwise leave readers nothing
        # to run on and the job would wait forever.
        ray.init(num_cpus=max(4, os.cpu_count() or 1), **options)
    import ray.data  # sets up its loggers, which console then quiets

    console.quiet_ray_loggers()
    console.quiet_raylet_messages()


def _local_cluster_running() -> bool:
    """A cluster started with `ray start` on this machine (not some other process's
    private in-process Ray), and still alive."""
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    address = find_bootstrap_address(None)  # written by `ray start`, removed by `ray stop`
    return bool(address) and address in find_gcs_addresses()


def run_prepare(args: argparse.Namespace) -> int:
    from detector import prepare

    config = cfg.from_args(cfg.PrepareConfig, args)
    init_ray()
    manifest = prepare.run(config)
    print_prepare_summary(manifest, config.out)
    return 0


def print_prepare_summary(manifest: dict, out: str) -> None:
    counts = manifest["counts"]
    print(f"\nPrepared {manifest['written']} of {manifest['objects']} objects into {out} "
          f"({manifest['images_per_second']} objects/s)")
    for split in ("train", "val", "test"):
        print(f"  {split:5s} real={counts[split]['real']:6d} fake={counts[split]['fake']:6d}")
    print(f"  skipped={len(manifest['skipped'])} duplicates={manifest['duplicates']}")
    near = manifest.get("near_duplicates") or {}
    if near.get("distance") is not None:
        print(f"  near-duplicate groups={near['groups']} ({near['images']} images, pHash within "
              f"{near['distance']} bits): {near['straddling_by_bytes']} would have straddled "
              f"splits by byte hash; {near['moved']} images moved to their group's split")
    by_code: dict[str, int] = {}
    for item in manifest["skipped"]:
        by_code[item["error"]] = by_code.get(item["error"], 0) + 1
    if by_code:
        print("  skipped by code: " + ", ".join(f"{k}={v}" for k, v in sorted(by_code.items())))
    audit = manifest["audit"]
    print("  trivial-rule accuracy: " + ", ".join(
        f"{k}={v:.0%}" for k, v in audit["trivial_rule_accuracy"].items()))
    for warning in audit["warnings"]:
        print(f"  WARNING: {warning}", file=sys.stderr)


def run_train(args: argparse.Namespace) -> int:
    from detector.train import train_models

    config = cfg.from_args(cfg.TrainConfig, args)
    init_ray()
    result = train_models(config)
    print("\n" + result["comparison"])
    print_exports(result["models"])
    return 0


def print_exports(models: list[dict]) -> None:
    """One line per model: the exports published with it, and any refused."""
    for model in models:
        line = f"{model['model']}: exports {', '.join(model['exports']) or 'none'}"
        if model["export_refused"]:
            line += f"; {model['export_refused']}"
        print(line)


def run_scan(args: argparse.Namespace) -> int:
    from detector.scan import ScanCannotFit, ScanStalled, scan

    config = cfg.from_args(cfg.ScanConfig, args)
    init_ray()
    try:
        print_scan_summary(scan(config), explain=config.explain_selection)
    except (ScanStalled, ScanCannotFit) as exc:
        print(f"detector scan: error: {exc}", file=sys.stderr)
        return 1
    return 0


def print_scan_summary(summary: dict, explain: bool = False) -> None:
    print(f"\nScanned {summary['objects']} objects into {summary['out']} "
          f"({summary['parts']} parts) via {summary['via']} with {summary['model']}: "
          f"{summary['scanned']} scored now ({summary['objects_per_second']} objects/s), "
          f"{summary['reused']} reused from the previous report")
    print("  by verdict: " + (", ".join(f"{k}={v}" for k, v in summary["by_verdict"].items())
                              or "none"))
    print("  by error:   " + (", ".join(f"{k}={v}" for k, v in summary["by_error"].items())
                              or "none"))
    not_read = summary.get("not_scanned") or {}
    print("  not read:   " + NotSelected(not_read).summary())
    for reason, entry in (not_read.get("by_reason") or {}).items() if explain else ():
        for uri in entry["examples"]:
            print(f"    {reason}: {uri}")
    near = summary.get("near_duplicates")
    if near:
        print(f"  near-duplicates: {near['groups']} groups holding {near['images']} objects "
              f"({near['mixed_verdicts']} with mixed verdicts), listed in "
              f"{summary['out']}/{near['listing']}")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """--backend and --precision, as every command that scores images takes them."""
    parser.add_argument("--backend", default="auto", choices=cfg.BACKENDS,
                        help=cfg.BACKEND_HELP)
    parser.add_argument("--precision", default="float32", choices=cfg.PRECISIONS,
                        help=cfg.PRECISION_HELP)


def run_export(args: argparse.Namespace) -> int:
    from detector.export import ExportRefused, add_exports

    try:
        exports = add_exports(args.model, int8=args.int8, shards_uri=args.data,
                              max_auc_drop=args.max_auc_drop)
    except ExportRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for kind, record in exports.items():
        print(f"{kind}: {record['file']} on {record['runtime']}: max |score diff| "
              f"{record['max_abs_diff']:.2g}, verdicts agree {record['verdict_agreement']:.1%}, "
              f"ROC AUC change {record['auc_change']:+.4f} ({record['images']} test images)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import ray

    from detector.serve import run

    init_ray()
    try:
        run(cfg.ServeConfig(model_uri=args.model, min_replicas=args.min_replicas,
                        max_replicas=args.max_replicas, backend=args.backend,
                        precision=args.precision,
                        scan_allow=tuple(args.scan_allow)),
            host=args.host, port=args.port)
    finally:  # a Ray this process started goes with it: no agents left behind
        ray.shutdown()
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from detector.evaluate import evaluate_artifact

    if args.recalibrate:
        from detector.evaluate import recalibrate_artifact

        print(json.dumps(recalibrate_artifact(args.model, args.data, args.backend,
                                              args.precision, args.threshold_policy), indent=2))
        return 0
    if not args.out:
        raise ValueError("--out is required (or --recalibrate, which publishes a version)")
    headline = evaluate_artifact(args.model, args.data, args.split, args.out,
                                 backend=args.backend, precision=args.precision)
    print(json.dumps(headline, indent=2))
    return 0


def run_ensemble(args: argparse.Namespace) -> int:
    from detector import ensemble, storage
    from detector.evaluate import parse_policy

    parse_policy(args.threshold_policy)
    row = ensemble.build(args.models, args.data, args.out, weights=args.weights,
                         name=args.name, policy=args.threshold_policy, backend=args.backend,
                         precision=args.precision)
    print(f"{row['model']}@{row['id']} of {' + '.join(row['members'])}: test ROC AUC "
          f"{row['roc_auc']:.4f}, accuracy {row['accuracy']:.4f} -> {row['artifact']}")
    print(storage.read_bytes(storage.join(args.out, "comparison.md")).decode(), end="")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from detector import provenance, storage
    from detector.artifact import resolve
    from detector.predictor import Prediction, Predictor

    provenance.check_settings()
    model_uri = resolve(args.model)  # one version for the scores and the explanations
    predictor = Predictor.from_uri(model_uri, backend=args.backend, precision=args.precision)
    blobs, read_errors = [], {}
    for i, uri in enumerate(args.images):
        try:
            blobs.append(storage.read_bytes(uri))
        except OSError as exc:
            blobs.append(b"")
            read_errors[i] = Prediction(None, None, error="read-failed", error_detail=str(exc))
    predictions = predictor.predict_bytes(blobs, consistency=args.consistency)
    explained = {}
    if args.explain:
        from detector.explain import explain_files

        explained = explain_files(model_uri, blobs, args.images, args.explain)
    for i, (uri, prediction) in enumerate(zip(args.images, predictions, strict=True)):
        prediction = read_errors.get(i, prediction)
        if args.json:
            extra = {"explanation": explained[i]} if i in explained else {}
            print(json.dumps({"uri": uri, **prediction.__dict__, **extra}))
        elif prediction.error:
            print(f"{uri}\terror={prediction.error}\t{prediction.error_detail}")
        else:
            line = f"{uri}\t{prediction.score_ai:.6f}\t{prediction.verdict}\t" \
                   f"{prediction.decided_by}"
            if prediction.evidence:  # what made it uncertain, else the strongest finding
                first = next((e for e in prediction.evidence if e["source"] == "consistency"),
                             prediction.evidence[0])
                line += f"\t{first['source']} {first['strength']}: {first['detail']}"
            print(line)
    if args.explain:
        print(f"wrote {len(explained)} explanations to {args.explain}", file=sys.stderr)
    return 0


def run_models(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_trained(args.out)
    from detector.models import build_model, get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        line = f"{name:18s} family={spec.family:10s} image_size={spec.image_size:4d}"
        if args.params:
            model = build_model(name)
            trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
            line += f" params={model.count_params():>11,d} trainable={trainable:>11,d}"
        print(f"{line}  {spec.description}")
    return 0


def list_trained(out: str | None) -> int:
    """One line per version under OUT/<name>/ (or OUT itself), oldest first, `*` latest."""
    from detector import storage
    from detector.artifact import POINTER_FILE, list_versions

    if not out:
        raise ValueError("detector models list OUT: name the training output URI")
    names = [out] if storage.exists(storage.join(out, POINTER_FILE)) else sorted(
        {storage.join(out, item.uri.rstrip("/").split("/")[-2])
         for item in storage.list_objects(out, patterns=[POINTER_FILE])})
    if not names:
        raise FileNotFoundError(f"no trained models under {out} (no {POINTER_FILE})")
    for name in names:
        for version in list_versions(name):
            metrics = "  ".join(f"{key}={version[key]:.4f}" for key in
                                ("accuracy", "roc_auc", "tpr_at_1pct_fpr", "ece")
                                if isinstance(version.get(key), float))
            mark = "*" if version["latest"] else " "
            print(f"{mark} {version['name']}@{version['id']}  {version['created_at']}  "
                  f"{metrics}  {version['uri']}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from detector.demo import run

    return run(args.workdir)
