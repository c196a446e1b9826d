"""Cluster-facing settings in one place: node shapes, job flags and the Serve config.

Everything that runs on a cluster takes its numbers from here, so the KubeRay manifests,
`serve deploy` on a laptop and the local autoscaling test cannot drift apart:

- `cluster/*.yaml` are rendered by `python -m detector.deploy render cluster/` (a test
  fails when the committed files differ from a fresh render);
- `serve_config(model_uri)` is the RayService's `serveConfigV2` and a `serve deploy` file;
- `WORKER_GROUPS` shapes the fake nodes of `tests/cluster/test_autoscaling.py`.

Importing this module is cheap (no Ray, no TensorFlow); pyyaml loads only to render.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detector.config import ServeConfig

RAY_VERSION = "2.60.0"
KUBERAY_VERSION = "1.7.0"
BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"  # cluster/Dockerfile builds FROM this
IMAGE = "ghcr.io/YOUR-ORG/ai-image-detector:0.1.0"  # ours; the GPU variant adds GPU_SUFFIX
GPU_SUFFIX = "-gpu"
BUCKET = "YOUR-BUCKET"
REGION = "us-east-1"

APP_NAME = "detector"  # the Serve application; `detector scan --via serve` finds it by name
LABEL = {"app.kubernetes.io/part-of": "ai-image-detector"}
SERVICE_ACCOUNT = "detector"  # annotate it for IRSA / workload identity instead of keys
STORAGE_CONFIGMAP = "detector-storage"  # AWS_DEFAULT_REGION, optional AWS_ENDPOINT_URL
S3_SECRET = "detector-s3"  # optional AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
API_KEY_SECRET, API_KEY_KEY = "detector-api-key", "api-key"
RAY_TOKEN_SECRET = "detector-ray-token"  # key `auth_token`; KubeRay authOptions.secretName


# ---------------------------------------------------------------------------- node shapes


@dataclass(frozen=True)
class NodeShape:
    """One Ray pod. Requests equal limits, and KubeRay turns the limits into Ray's logical
    CPU/GPU/memory, so this is exactly what Ray's scheduler and autoscaler see."""

    cpus: int
    memory_gib: int
    gpus: int = 0
    min_replicas: int = 0
    max_replicas: int = 0
    idle_timeout_s: int = 0

    def ray_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def fits(self, cpus: float, gpus: float = 0.0) -> bool:
        return cpus <= self.cpus and gpus <= self.gpus


# Runs GCS, the dashboard, the autoscaler and job drivers; `num-cpus: 0` keeps tasks off it.
HEAD = NodeShape(cpus=2, memory_gib=8)
WORKER_GROUPS: dict[str, NodeShape] = {
    # Decoding, Ray Data, scan actors, the Serve ingress. Three fit a 16 vCPU / 64 GiB node.
    "cpu": NodeShape(cpus=4, memory_gib=16, max_replicas=16, idle_timeout_s=300),
    # Training workers and Serve model replicas, one GPU each. 7 CPU / 28 GiB rather than
    # 8 / 32 so one pod fits an 8 vCPU / 32 GiB GPU instance (g5.2xlarge, g6.2xlarge) after
    # kubelet and daemonset reservations. GPU nodes start slowly: they idle longer.
    "gpu": NodeShape(cpus=7, memory_gib=28, gpus=1, max_replicas=4, idle_timeout_s=600),
}
AUTOSCALER_SIDECAR = {"cpu": "500m", "memory": "512Mi"}


# ---------------------------------------------------------------------------- job settings


@dataclass(frozen=True)
class Paths:
    """Where the jobs read and write. `render --bucket` replaces the placeholder bucket."""

    bucket: str = BUCKET

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join((self.bucket, *parts))

    @property
    def model(self) -> str:  # what the RayService serves and the scan job uses
        return self.uri("models", "resnet50v2")

    @property
    def shards(self) -> str:  # the prepare job's output, the train job's input
        return self.uri("shards", "coco-vs-diffusiondb-224", "")

    @property
    def serve_sources(self) -> dict[str, Any]:
        """The RayService's bucket access: scans of the scan job's prefix, and reviewers'
        labels where the retrain job reads them."""
        return {"scan_allow": (self.uri("incoming", ""),), "labels_uri": self.uri("labels", "")}


@dataclass(frozen=True)
class PrepareJob:
    per_class: int = 100_000  # the notebook's 200k images
    split: str = "0.7,0.15,0.15"
    image_size: int = 224
    seed: int = 42

    def argv(self, paths: Paths) -> list[str]:
        return _argv("prepare", real=paths.uri("coco2017", ""),
                     fake=paths.uri("diffusiondb", ""), out=paths.shards,
                     **dataclasses.asdict(self))


@dataclass(frozen=True)
class TrainJob:
    model: str = "resnet50v2,vit"
    workers: int = 4  # one per GPU pod: at most WORKER_GROUPS["gpu"].max_replicas
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 4.0  # of a GPU pod's 7; the rest run Ray Data next to it
    batch_size: int = 128  # global: 32 per GPU, the notebook's per-device batch
    epochs: int = 20
    augment: str = "robust"  # same JPEG/blur/resize on both classes (format shortcut)
    int8: bool = True  # the CPU scan pods' runtime (ScanJob.precision)
    max_failures: int = 3  # a preempted GPU pod costs one epoch, not the run
    resume: bool = True  # a RayJob retry (backoffLimit) continues from the last checkpoint

    def argv(self, paths: Paths) -> list[str]:
        return _argv("train", data=paths.shards, out=paths.uri("models", ""),
                     **dataclasses.asdict(self))


@dataclass(frozen=True)
class RetrainJob:
    """The learning loop on the train job's GPU pods: every label the Serve app has taken,
    folded into the prepare job's shards (always that base: labels accumulate, so each
    run starts from the curated set, not from the last run's), a fine-tune of the served
    name's latest, the gate, and promotion when it passes."""

    workers: int = TrainJob.workers
    gpus_per_worker: float = TrainJob.gpus_per_worker
    cpus_per_worker: float = TrainJob.cpus_per_worker
    epochs: int = 5
    lr: float = 1e-5

    def argv(self, paths: Paths) -> list[str]:
        return _argv("retrain", model=paths.model, labels=paths.serve_sources["labels_uri"],
                     base=paths.shards,
                     shards=paths.uri("shards", "coco-vs-diffusiondb-224-reviewed", ""),
                     report=paths.uri("retrain", ""), **dataclasses.asdict(self))


@dataclass(frozen=True)
class ScanJob:
    """Bucket scans score on CPU pods: decoding dominates, and CPU pods start in a minute
    while GPU nodes take several (see cluster/README.md for the GPU variant). The scoring
    pool grows with the CPU group (no --actors bound): each actor takes 3 of a pod's 4
    CPUs, the fourth decodes beside it."""

    via: str = "data"  # its own actor pool; the RayJob's cluster runs no Serve app
    backend: str = "openvino"  # said outright: a missing export fails the job, never slows it
    # int8 (~9x TensorFlow float32 on a CPU with VNNI/AMX, bench/predictor.py) where the
    # train job publishes the int8 export, as it does by default.
    precision: str = "int8" if TrainJob.int8 else "float32"
    batch_size: int = 64
    cpus_per_actor: float = 3.0
    gpus_per_actor: float = 0.0
    partition_size: int = 65536  # objects per report part: the work a retry repeats at most
    resume: bool = True  # a RayJob retry keeps the parts already written, scans the rest

    def argv(self, paths: Paths) -> list[str]:
        return _argv("scan", paths.uri("incoming", ""), model=paths.model,
                     out=paths.uri("reports", "incoming", ""), **dataclasses.asdict(self))


PREPARE, TRAIN, RETRAIN, SCAN = PrepareJob(), TrainJob(), RetrainJob(), ScanJob()


def _argv(job: str, *positional: str, **flags: Any) -> list[str]:
    """`python jobs/<job>.py POSITIONAL --flag value ...`; True is a bare flag, False/None
    are left out, so every value shown is one the job's parser must accept."""
    argv = ["python", f"jobs/{job}.py", *positional]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, _number(value)]
    return argv


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def entrypoint(argv: Sequence[str]) -> str:
    return shlex.join(argv)


# ---------------------------------------------------------------------------- Serve


# The cluster's Serve app: ServeConfig's defaults (the one place they live) but for these.
SERVE = ServeConfig(
    max_replicas=4,  # model replicas take one GPU each: the GPU group's maximum
    target_ongoing_requests=32.0,  # half of a full batch in flight per replica
    max_batch_size=64,  # so 128 ongoing per replica: a full batch plus the next filling up
    max_queued_requests=512,  # beyond it callers get 503, not an unbounded queue
    downscale_delay_s=300.0,  # a GPU replica is slow to come back: keep it a while
    num_gpus=1.0,  # backend auto: ONNX Runtime's CUDA provider where installed, else Keras
    ingress_replicas=2,  # on different nodes (max_replicas_per_node below)
    ingress_num_cpus=1.0,  # decoding happens in the ingress
)
HEALTH_CHECK = {"health_check_period_s": 10.0, "health_check_timeout_s": 30.0}


def serve_config(
    model_uri: str, *, host: str = "0.0.0.0", port: int = 8000, **overrides: Any
) -> dict[str, Any]:
    """The Serve config (`serve deploy` file, RayService `serveConfigV2`) for `model_uri`.

    `overrides` replace `SERVE`'s fields (unknown names raise TypeError). The
    `deployments` section repeats what `build_app` sets from the same args, so the config
    shows the resources and bounds a platform engineer plans capacity with.
    """
    s = dataclasses.replace(SERVE, model_uri=model_uri, **overrides)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "detector.serving:build_app",
            "args": s.to_args(),
            "deployments": [
                {
                    "name": "Ingress",
                    "num_replicas": s.ingress_replicas,
                    "max_replicas_per_node": 1,  # two replicas survive losing one node
                    "max_ongoing_requests": s.ingress_max_ongoing_requests,
                    "ray_actor_options": {"num_cpus": s.ingress_num_cpus},
                },
                {
                    "name": "Model",
                    "autoscaling_config": {
                        "min_replicas": s.min_replicas,
                        "max_replicas": s.max_replicas,
                        "target_ongoing_requests": s.target_ongoing_requests,
                        "upscale_delay_s": s.upscale_delay_s,
                        "downscale_delay_s": s.downscale_delay_s,
                        "look_back_period_s": s.look_back_period_s,
                    },
                    "max_ongoing_requests": s.model_max_ongoing(),
                    "max_queued_requests": s.max_queued_requests,
                    "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
                    **HEALTH_CHECK,  # Model.check_health runs a forward pass
                },
            ],
        }],
    }


# ---------------------------------------------------------------------------- manifests


def _env_sources() -> list[dict]:
    # Credentials never appear in a manifest: a Secret (optional, so IRSA alone works) and a
    # ConfigMap for region and custom endpoint (MinIO, Ceph).
    return [{"configMapRef": {"name": STORAGE_CONFIGMAP, "optional": True}},
            {"secretRef": {"name": S3_SECRET, "optional": True}}]


def _pod(role: str, shape: NodeShape, image: str, *, serve: bool, head: bool) -> dict:
    limits: dict[str, str] = {"cpu": str(shape.cpus), "memory": f"{shape.memory_gib}Gi"}
    if shape.gpus:
        limits["nvidia.com/gpu"] = str(shape.gpus)
    ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}] if head else []
    if serve:
        ports.append({"containerPort": 8000, "name": "serve"})
    env = [{"name": "TF_CPP_MIN_LOG_LEVEL", "value": "2"}]
    if serve:  # Serve replicas inherit the raylet's environment, so the ingress sees it
        env.append({"name": SERVE.api_key_env, "valueFrom": {
            "secretKeyRef": {"name": API_KEY_SECRET, "key": API_KEY_KEY}}})
    container: dict[str, Any] = {
        "name": f"ray-{role}",
        "image": image + (GPU_SUFFIX if shape.gpus else ""),
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        "envFrom": _env_sources(),
        "env": env,
        # Ray's object store lives in /dev/shm; the container default is 64 MiB.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ports:
        container["ports"] = ports
    spec: dict[str, Any] = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if shape.gpus:  # GPU node pools are usually tainted; the GPU limit picks the node
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]
    return {"metadata": {"labels": dict(LABEL)}, "spec": spec}


def cluster_spec(image: str, groups: Sequence[str], *, serve: bool = False) -> dict:
    """A RayClusterSpec: autoscaler v2, token auth, a head that runs no work, and the
    named worker groups scaling from zero."""
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": WORKER_GROUPS["cpu"].idle_timeout_s,
            "resources": {"requests": dict(AUTOSCALER_SIDECAR),
                          "limits": dict(AUTOSCALER_SIDECAR)},
        },
        "authOptions": {"mode": "token", "secretName": RAY_TOKEN_SECRET},
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0"},
            "template": _pod("head", HEAD, image, serve=serve, head=True),
        },
        "workerGroupSpecs": [
            {
                "groupName": f"{name}-workers",
                "replicas": WORKER_GROUPS[name].min_replicas,
                "minReplicas": WORKER_GROUPS[name].min_replicas,
                "maxReplicas": WORKER_GROUPS[name].max_replicas,
                "idleTimeoutSeconds": WORKER_GROUPS[name].idle_timeout_s,
                "rayStartParams": {},
                "template": _pod("worker", WORKER_GROUPS[name], image, serve=serve,
                                 head=False),
            }
            for name in groups
        ],
    }


def _meta(name: str, component: str) -> dict:
    return {"name": name, "labels": {**LABEL, "app.kubernetes.io/component": component}}


def rayjob(name: str, argv: Sequence[str], image: str, groups: Sequence[str],
           deadline_s: int, retries: int = 1) -> dict:
    """A RayJob on a cluster of its own. `retries`: runs on a fresh cluster after a
    failure (jobs that resume themselves take one)."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _meta(name, "job"),
        "spec": {
            "entrypoint": entrypoint(argv),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,  # time to read logs before the cluster goes
            "activeDeadlineSeconds": deadline_s,
            "backoffLimit": retries,
            "submitterConfig": {"backoffLimit": 2},  # the submitter pod, not the job
            "rayClusterSpec": cluster_spec(image, groups),
        },
    }


def manifests(image: str = IMAGE, paths: Paths | None = None,
              region: str = REGION) -> dict[str, list[dict]]:
    """Every file in cluster/ (name -> documents)."""
    import yaml  # only rendering needs it

    paths = paths or Paths()
    common = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(SERVICE_ACCOUNT, "ray")},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(STORAGE_CONFIGMAP, "ray"),
         "data": {"AWS_DEFAULT_REGION": region}},
    ]
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(APP_NAME, "serve"),
        "spec": {
            # Blue/green: a new cluster comes up, Serve turns healthy, traffic switches.
            "upgradeStrategy": {"type": "NewCluster"},
            # The head runs no replicas: traffic enters through the workers' proxies.
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": yaml.safe_dump(serve_config(paths.model, **paths.serve_sources),
                                            sort_keys=False, width=4096),
            "rayClusterConfig": cluster_spec(image, ("cpu", "gpu"), serve=True),
        },
    }
    return {
        "common.yaml": common,
        "raycluster.yaml": [{"apiVersion": "ray.io/v1", "kind": "RayCluster",
                             "metadata": _meta("detector-cluster", "cluster"),
                             "spec": cluster_spec(image, ("cpu", "gpu"))}],
        "rayjob-prepare.yaml": [rayjob("detector-prepare", PREPARE.argv(paths), image,
                                       ("cpu",), deadline_s=4 * 3600)],
        "rayjob-train.yaml": [rayjob("detector-train", TRAIN.argv(paths), image,
                                     ("cpu", "gpu"), deadline_s=24 * 3600)],
        "rayjob-scan.yaml": [rayjob("detector-scan", SCAN.argv(paths), image, ("cpu",),
                                    deadline_s=6 * 3600)],
        # No retry: a second run would publish a second candidate; rerun it by hand.
        "rayjob-retrain.yaml": [rayjob("detector-retrain", RETRAIN.argv(paths), image,
                                       ("cpu", "gpu"), deadline_s=12 * 3600, retries=0)],
        "rayservice.yaml": [service],
    }


HEADERS = {
    "common.yaml": "ServiceAccount (annotate for IRSA) and the storage ConfigMap; add "
                   "AWS_ENDPOINT_URL to it for MinIO/Ceph.",
    "raycluster.yaml": "Long-lived autoscaling RayCluster for `ray job submit` and notebooks.",
    "rayjob-prepare.yaml": "RayJob: COCO + DiffusionDB objects -> training shards (CPU pods).",
    "rayjob-train.yaml": "RayJob: data-parallel training on GPU pods, then evaluation.",
    "rayjob-scan.yaml": "RayJob: every image under a prefix -> a Parquet report (CPU pods).",
    "rayjob-retrain.yaml": "RayJob: reviewers' labels -> shards -> fine-tune -> gate -> "
                           "promote (GPU pods).",
    "rayservice.yaml": "RayService: the HTTP detection endpoint (Serve), autoscaled on GPUs.",
}


def dump(docs: Sequence[dict], header: str) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors in manifests
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None  # serveConfigV2 stays readable
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    lines = [f"# {header}",
             "# Generated from detector/deploy.py by `python -m detector.deploy render "
             "cluster/`:",
             "# edit that file and re-render (tests fail when this file drifts from it).",
             "---"]
    body = "---\n".join(yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=4096)
                        for doc in docs)
    return "\n".join(lines) + "\n" + body


def render_manifests(out_dir: str | Path, image: str = IMAGE, bucket: str = BUCKET,
                     region: str = REGION) -> list[Path]:
    """Write every manifest into `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in manifests(image, Paths(bucket), region).items():
        path = out / name
        path.write_text(dump(docs, HEADERS[name]))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(prog="python -m detector.deploy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="write the KubeRay manifests")
    render.add_argument("out_dir", nargs="?", default="cluster")
    render.add_argument("--image", default=IMAGE, help="CPU image; GPU pods add -gpu")
    render.add_argument("--bucket", default=BUCKET)
    render.add_argument("--region", default=REGION)
    config = commands.add_parser("serve-config", help="print a `serve deploy` config")
    config.add_argument("--model", required=True, help="model artifact URI")
    config.add_argument("--host", default="0.0.0.0")
    config.add_argument("--port", type=int, default=8000)
    config.add_argument("--cpu", action="store_true",
                        help="model replicas on CPUs (num_gpus=0, num_cpus=4)")
    args = parser.parse_args(argv)
    if args.command == "render":
        for path in render_manifests(args.out_dir, args.image, args.bucket, args.region):
            print(path)
    else:
        overrides = {"num_gpus": 0.0, "num_cpus": 4.0} if args.cpu else {}
        config_dict = serve_config(args.model, host=args.host, port=args.port, **overrides)
        sys.stdout.write(yaml.safe_dump(config_dict, sort_keys=False, width=4096))
    return 0


if __name__ == "__main__":
    sys.exit(main())
