"""What the commands and the demo share: joining Ray, printing summaries, scoring files."""

from __future__ import annotations

import json
import logging
import os
import sys

from detector.io import console
from detector.io.selection import NotSelected


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


def print_prepare_summary(manifest: dict, out: str) -> None:
    counts = manifest["counts"]
    print(f"\nPrepared {manifest['written']} of {manifest['objects']} objects into {out} "
          f"({manifest['images_per_second']} objects/s)")
    for split in ("train", "val", "test"):
        print(f"  {split:5s} real={counts[split]['real']:6d} fake={counts[split]['fake']:6d}")
    for title, key in (("generator", "generators"), ("real source", "real_sources")):
        named = manifest.get(key) or {}
        for name in named.get("train", {}):
            print(f"  {title} {name}: " + " ".join(
                f"{split}={named[split][name]}" for split in ("train", "val", "test")))
    labels = manifest.get("reviewed")
    if labels:
        print(f"  labels: {labels['images']} images ({labels['conflicting']} labelled both "
              f"ways): {labels['written']} read in as source review, {labels['replaced']} of "
              f"them replacing base rows; {labels['relabeled']} base images relabelled by "
              f"hash, {labels['unmatched']} hashes matching no image")
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


def print_exports(models: list[dict]) -> None:
    """One line per model: the exports published with it, and any refused."""
    for model in models:
        line = f"{model['model']}: exports {', '.join(model['exports']) or 'none'}"
        if model["export_refused"]:
            line += f"; {model['export_refused']}"
        print(line)


def print_scan_summary(summary: dict, explain: bool = False) -> None:
    print(f"\nScanned {summary['objects']} objects into {summary['out']} "
          f"({summary['parts']} parts) via {summary['via']} with {summary['model']}: "
          f"{summary['scanned']} scored now ({summary['objects_per_second']} objects/s), "
          f"{summary['reused']} reused from the previous report")
    if summary.get("by_media"):  # rows whose bytes were read: images, videos
        print("  by media:   " + ", ".join(f"{k}={v}" for k, v in summary["by_media"].items()))
    print("  by verdict: " + (", ".join(f"{k}={v}" for k, v in summary["by_verdict"].items())
                              or "none"))
    if summary.get("by_generator"):  # only for models or files that name generators
        print("  by generator: " + ", ".join(f"{k}={v}"
                                             for k, v in summary["by_generator"].items()))
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


def predict_files(model: str, images: list[str], backend: str = "auto",
                  precision: str = "float32", consistency: bool = False,
                  explain: str | None = None, as_json: bool = False) -> None:
    """Score `images` with `model` and print a line each (`detector predict`)."""
    from detector.io import storage
    from detector.model.artifact import resolve
    from detector.model.predictor import Prediction, Predictor
    from detector.verdicts import provenance

    provenance.check_settings()
    model_uri = resolve(model)  # one version for the scores and the explanations
    predictor = Predictor.from_uri(model_uri, backend=backend, precision=precision)
    blobs, read_errors = [], {}
    for i, uri in enumerate(images):
        try:
            blobs.append(storage.read_bytes(uri))
        except OSError as exc:
            blobs.append(b"")
            read_errors[i] = Prediction(None, None, error="read-failed", error_detail=str(exc))
    predictions = predictor.predict_bytes(blobs, consistency=consistency)
    explained = {}
    if explain:
        from detector.model.explain import explain_files

        explained = explain_files(model_uri, blobs, images, explain)
    for i, (uri, prediction) in enumerate(zip(images, predictions, strict=True)):
        prediction = read_errors.get(i, prediction)
        if as_json:
            extra = {"explanation": explained[i]} if i in explained else {}
            print(json.dumps({"uri": uri, **prediction.__dict__, **extra}))
        elif prediction.error:
            print(f"{uri}\terror={prediction.error}\t{prediction.error_detail}")
        else:
            line = f"{uri}\t{prediction.score_ai:.6f}\t{prediction.verdict}\t" \
                   f"{prediction.decided_by}"
            if prediction.generator is not None:
                line += f"\tgenerator={prediction.generator} ({prediction.generator_decided_by})"
            if getattr(prediction, "media", None) == "video":
                line += f"\tvideo {prediction.duration_s:.1f} s: {prediction.frames_scored} " \
                        f"frames, most AI-like at {prediction.worst_frame_s:.1f} s"
            if prediction.evidence:  # what made it uncertain, else the strongest finding
                doubts = ("consistency", "familiarity", "frames") \
                    if prediction.decided_by == "classifier" else ()
                first = next((e for e in prediction.evidence if e["source"] in doubts),
                             prediction.evidence[0])
                line += f"\t{first['source']} {first['strength']}: {first['detail']}"
            print(line)
    if explain:
        print(f"wrote {len(explained)} explanations to {explain}", file=sys.stderr)
