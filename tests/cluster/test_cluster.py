"""cluster/ is what a platform engineer applies: check it as far as this machine allows.

Static (unit): the manifests validate against the real KubeRay CRDs, equal a fresh render
of detector/deploy.py, and every import_path, entrypoint script and flag in them exists in
the code. Live (e2e): `ray start --head`, then `serve deploy` of the RayService's own Serve
config and `ray job submit` of the scan RayJob's own entrypoint, both on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from artifacts import save_exported
from ray_cluster import BIN, client_env, free_port, ray_cli, ray_head, wait_for

from detector import deploy

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
VALIDATOR = REPO.parent / "shared" / "tools" / "validate-kuberay"
API_KEY = "cluster-test-key-0123456789"
SIZE = 32


def documents(kind: str) -> list[dict]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == kind]
    return docs


def entrypoints() -> dict[str, list[str]]:
    return {job["metadata"]["name"]: shlex.split(job["spec"]["entrypoint"])
            for job in documents("RayJob")}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from detector.cli.commands import build_parser

    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ------------------------------------------------------------------------- static checks


@pytest.mark.unit
def test_manifests_pass_validate_kuberay():
    if not VALIDATOR.exists():
        pytest.skip(f"{VALIDATOR} not present (needs the shared tools checkout next to the repo)")
    result = subprocess.run(
        [sys.executable, str(VALIDATOR), "--ray-version", deploy.RAY_VERSION, str(CLUSTER)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 invalid" in result.stdout


@pytest.mark.unit
def test_manifests_equal_a_fresh_render(tmp_path):
    written = deploy.render_manifests(tmp_path)
    assert {p.name for p in written} == {p.name for p in CLUSTER.glob("*.yaml")}, \
        "cluster/ holds a manifest that detector/deploy.py does not render (or lacks one)"
    for path in written:
        assert (CLUSTER / path.name).read_text() == path.read_text(), (
            f"cluster/{path.name} drifted from detector/deploy.py; run "
            "`python -m detector.deploy render cluster/`")


@pytest.mark.unit
def test_rayservice_serve_config_is_deploy_serve_config():
    (service,) = documents("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    model_uri = config["applications"][0]["args"]["model_uri"]
    assert model_uri == deploy.Paths().model
    assert config == deploy.serve_config(model_uri, **deploy.Paths().serve_sources)


@pytest.mark.unit
def test_import_paths_resolve_and_accept_their_args(model_uri):
    (service,) = documents("RayService")
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        module_name, _, attr = app["import_path"].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            pytest.fail(f"import_path {app['import_path']}: {err}")
        builder = getattr(module, attr, None)
        assert callable(builder), f"{app['import_path']} is not a callable in the code"
        # Unknown or invalid args raise here, not on the cluster. The model is a real one
        # on disk: building pins the version the name points at.
        builder({**app["args"], "model_uri": model_uri})


@pytest.mark.unit
def test_serve_config_deployments_match_what_the_app_binds(model_uri):
    """The config's `deployments` overrides repeat what build_app sets from the same
    args; a mismatch would mean Kubernetes and `detector serve` run different settings."""
    from ray.serve.deployment import Application

    from detector.serving import app as serve

    app_config = deploy.serve_config(model_uri)["applications"][0]
    assert app_config["name"] == serve.APP_NAME

    def bound(app: Application) -> Iterator:
        yield app._bound_deployment
        for arg in app._bound_deployment.init_args:
            if isinstance(arg, Application):
                yield from bound(arg)

    in_code = {d.name: d for d in bound(serve.build_app(app_config["args"]))}
    assert {d["name"] for d in app_config["deployments"]} <= set(in_code)
    for options in app_config["deployments"]:
        code = in_code[options["name"]]
        settings = code._deployment_config
        for key, value in options.items():
            if key in ("name", *deploy.HEALTH_CHECK, "max_replicas_per_node"):
                continue  # config-only settings: nothing in code to disagree with
            if key == "autoscaling_config":
                for name, bound_value in value.items():
                    assert getattr(settings.autoscaling_config, name) == bound_value, name
            elif key == "ray_actor_options":
                assert code.ray_actor_options == value
            else:
                assert getattr(code, key) == value, f"{options['name']}.{key}"


@pytest.mark.unit
@pytest.mark.parametrize("job", sorted(entrypoints()))
def test_entrypoint_script_and_flags_exist(job):
    argv = entrypoints()[job]
    assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
    script = REPO / argv[1]
    assert script.is_file(), f"{job}: {argv[1]} does not exist"
    command = script.stem  # jobs/<x>.py forwards to `detector <x>`
    parsers = subcommands()
    if command not in parsers:
        pytest.skip(f"`detector {command}` is not in detector/cli/commands.py yet")
    parser = parsers[command]
    known = set(parser._option_string_actions)
    # Exact names only: argparse would also accept unambiguous prefixes of real flags.
    unknown = [a for a in argv[2:] if a.startswith("--") and a not in known]
    assert not unknown, f"{job}: `detector {command}` has no {unknown}"
    try:
        parser.parse_args(argv[2:])
    except SystemExit:
        pytest.fail(f"{job}: `detector {command}` rejects {shlex.join(argv[2:])}")


@pytest.mark.unit
def test_deploy_module_imports_nothing_heavy():
    code = ("import sys, detector.deploy; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('ray', 'tensorflow', 'keras', 'yaml')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.unit
def test_job_requests_fit_the_worker_groups():
    """A request no group can hold never schedules: the autoscaler cannot help."""
    cpu, gpu = deploy.WORKER_GROUPS["cpu"], deploy.WORKER_GROUPS["gpu"]
    train, scan, serve = deploy.TRAIN, deploy.SCAN, deploy.SERVE
    assert gpu.fits(train.cpus_per_worker, train.gpus_per_worker)
    # Ray Train places all workers at once: the group must be able to hold them together.
    assert train.workers * train.gpus_per_worker <= gpu.max_replicas * gpu.gpus
    # A scoring actor and a decode task beside it fit one CPU pod.
    assert cpu.fits(scan.cpus_per_actor + 0.5, scan.gpus_per_actor)
    assert gpu.fits(serve.num_cpus, serve.num_gpus)
    assert serve.max_replicas * serve.num_gpus <= gpu.max_replicas * gpu.gpus
    assert cpu.fits(serve.ingress_num_cpus)
    assert deploy.HEAD.cpus >= 1  # the head runs no tasks, but job drivers run there


# ------------------------------------------------------------------------- live cluster


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[dict]:
    """DETECTOR_API_KEY is in the head's environment as the Secret puts it in the pods'."""
    with ray_head(tmp_path_factory.mktemp("head"), env={"DETECTOR_API_KEY": API_KEY}) as started:
        yield started


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    """An untrained vit_tiny artifact: the endpoint and scans need a model, not a good one.
    With its ONNX and int8 exports, as the train job publishes them: the scan job runs
    OpenVINO int8."""
    from detector.io import preprocess
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard

    uri = str(tmp_path_factory.mktemp("cluster") / "vit_tiny")
    card = ModelCard(name="vit_tiny", architecture="vit", image_size=SIZE,
                     preprocess_version=preprocess.PREPROCESS_VERSION)
    return save_exported(build_model("vit_tiny", image_size=SIZE), card, uri, int8=True)


def image_bytes() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.e2e
def test_serve_deploy_with_the_rayservice_config(head, model_uri, tmp_path):
    """The RayService's serveConfigV2, scaled to this machine only through overrides of
    resources and replica counts, deploys with `serve deploy` and answers over HTTP."""
    if importlib.util.find_spec("detector.serving.app") is None:
        pytest.skip("detector/serving/app.py does not exist yet")
    port = free_port()
    config = deploy.serve_config(
        model_uri, host="127.0.0.1", port=port, num_cpus=0.5, num_gpus=0.0, max_replicas=1,
        ingress_replicas=1, ingress_num_cpus=0.25,
    )
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        deploy_and_call(head, path, port)
    finally:  # the cluster is the module's: leave it as empty as it was
        subprocess.run([str(BIN / "serve"), "shutdown", "--yes", f"--address={head['address']}"],
                       env=client_env(), capture_output=True, timeout=120)


def deploy_and_call(head: dict, path: Path, port: int) -> None:
    import requests

    result = subprocess.run(
        [str(BIN / "serve"), "deploy", str(path), f"--address={head['address']}"],
        env=client_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 200,
             timeout=240, what="/healthz of the deployed app", alive=head["process"],
             log=head["log"])
    blob, headers = image_bytes(), {"Content-Type": "image/png"}
    # The key reached the replicas through the environment, as the Secret does on Kubernetes.
    assert requests.post(f"{base}/v1/detect", data=blob, headers=headers,
                         timeout=30).status_code == 401
    answer = requests.post(f"{base}/v1/detect", data=blob, timeout=30,
                           headers=headers | {"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 200, answer.text
    assert 0.0 <= answer.json()["score_ai"] <= 1.0
    status = subprocess.run([str(BIN / "serve"), "status", f"--address={head['address']}"],
                            env=client_env(), capture_output=True, text=True, timeout=60)
    assert deploy.APP_NAME in status.stdout and "RUNNING" in status.stdout, status.stdout


def with_values(argv: list[str], values: dict[str, str], positional: str | None) -> list[str]:
    """`argv` with some flag values (and the first positional) replaced."""
    out = list(argv[:2])
    rest, replaced_positional = argv[2:], False
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("--"):
            takes_value = i + 1 < len(rest) and not rest[i + 1].startswith("--")
            value = rest[i + 1] if takes_value else None
            out.append(token)
            if takes_value:
                out.append(values.get(token, value))
            i += 2 if takes_value else 1
        else:
            if positional is not None and not replaced_positional:
                token, replaced_positional = positional, True
            out.append(token)
            i += 1
    return out


@pytest.mark.e2e
def test_scan_rayjob_entrypoint_runs_under_ray_job_submit(head, model_uri, tmp_path):
    """The scan RayJob's entrypoint, with local paths for its URIs and actor counts this
    machine can hold, runs through `ray job submit --working-dir .` and writes its report."""
    import pyarrow.parquet as pq

    if "scan" not in subcommands() or not (REPO / "jobs" / "scan.py").exists():
        pytest.skip("`detector scan` / jobs/scan.py do not exist yet")
    from detector.data.sample import SampleSpec, write_sample

    source = tmp_path / "bucket"
    write_sample(str(source), SampleSpec(per_class=6, size=48, seed=3))
    objects = [p for p in source.rglob("*") if p.is_file()]  # all images, all selected
    report = tmp_path / "report"
    argv = with_values(entrypoints()["detector-scan"], {
        "--model": model_uri, "--out": str(report),
        "--actors": "1", "--cpus-per-actor": "1", "--batch-size": "8",
    }, positional=str(source))
    result = ray_cli("job", "submit", f"--address={head['address']}", "--working-dir",
                     str(REPO), "--", *argv, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    table = pq.read_table(report)
    assert table.num_rows == len(set(table.column("uri").to_pylist())) == len(objects) > 0
    assert table.column("score_ai").null_count == 0
    assert (report / "_manifest.json").exists()


@pytest.mark.e2e
def test_a_scan_beside_a_serve_app_of_another_model_fits_in_what_is_free(head, model_uri,
                                                                        tmp_path):
    """`detector serve --model B` holds 2.5 of the module cluster's 4 CPUs (the tests
    before it leave nothing running there), and this cluster cannot add nodes. `detector
    scan --model A` sizes its scoring actor from the 1.5 that are free and scores every
    object with A (it once asked for 2, waited 600 s and failed). Asked for more than is
    free, it fails within seconds and names what holds the CPUs."""
    import pandas as pd
    import requests

    from detector.data.sample import SampleSpec, write_sample
    from detector.model.architectures import build_model
    from detector.model.artifact import ModelCard, load_card

    source = tmp_path / "bucket"
    write_sample(str(source), SampleSpec(per_class=150, size=48, seed=5))
    other = save_exported(build_model("vit_tiny", image_size=SIZE),
                          ModelCard(name="other", architecture="vit", image_size=SIZE,
                                    preprocess_version=load_card(model_uri).preprocess_version),
                          str(tmp_path / "other"))  # its replica runs OpenVINO
    scorer = load_card(model_uri)
    env = client_env() | {"RAY_ADDRESS": head["gcs"]}
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "detector"), "serve", "--model", other, "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/healthz",
                                      timeout=5).status_code == 200,
                 timeout=240, what="detector serve", alive=server, log=log)

        def scan(out: str, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
            started = time.monotonic()
            done = subprocess.run(
                [str(BIN / "detector"), "scan", str(source), "--model", model_uri,
                 "--out", str(tmp_path / out), *flags],
                env=env, capture_output=True, text=True, timeout=300)
            return done, time.monotonic() - started

        refused, seconds = scan("refused", "--cpus-per-actor", "2")
        assert refused.returncode == 1 and seconds < 30, (seconds, refused.stderr[-3000:])
        assert "cannot add nodes" in refused.stderr
        assert "ServeReplica:detector:Model (2 CPU)" in refused.stderr, refused.stderr[-3000:]
        assert not (tmp_path / "refused" / "_manifest.json").exists()

        result, _ = scan("report")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "scoring actors reserve 1.0 CPUs: the largest node has free 1.5" \
            in result.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    frame = pd.read_parquet(tmp_path / "report")
    assert len(frame) == frame["uri"].nunique() == 300
    assert set(frame["model"]) == {f"{scorer.name}@{scorer.id}"}
    assert frame["score_ai"].notna().all()


@pytest.mark.e2e
def test_scan_with_default_flags_completes_on_a_two_cpu_cluster(model_uri, tmp_path):
    """`ray start --head --num-cpus 2`, no autoscaler: the scoring actor must leave room
    for decoding (it once reserved both CPUs and the scan waited forever)."""
    import pyarrow.dataset as pads

    from detector.data.sample import SampleSpec, write_sample

    source = tmp_path / "bucket"
    write_sample(str(source), SampleSpec(per_class=20, size=48, seed=4))
    with ray_head(tmp_path, num_cpus=2, env={"DETECTOR_API_KEY": API_KEY}) as small:
        result = subprocess.run(
            [str(BIN / "detector"), "scan", str(source), "--model", model_uri,
             "--out", str(tmp_path / "report"), "--via", "data"],
            env=client_env() | {"RAY_ADDRESS": small["gcs"]}, capture_output=True, text=True,
            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "scoring actors reserve 1.5 CPUs" in result.stderr
    # The committed report reads back the documented ways, with the documented types.
    import duckdb
    import pandas as pd

    out = tmp_path / "report"
    assert pads.dataset(str(out)).count_rows() == 40
    frame = pd.read_parquet(out)
    assert len(frame) == frame["uri"].nunique() == 40
    assert str(frame["scanned_at"].dtype) == "datetime64[us, UTC]"
    assert frame["score_ai"].dtype == "float64" and frame["size_bytes"].dtype == "int64"
    [(rows, uris, verdicts)] = duckdb.sql(
        f"SELECT count(*), count(DISTINCT uri), count(verdict) "
        f"FROM read_parquet('{out}/*.parquet')").fetchall()
    assert rows == uris == verdicts == 40
    described = duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{out}/*.parquet')")
    types = {name: kind for name, kind, *_ in described.fetchall()}
    assert types["score_ai"] == "DOUBLE" and types["scanned_at"] == "TIMESTAMP WITH TIME ZONE"
