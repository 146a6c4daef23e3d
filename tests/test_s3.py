"""Object storage against a real S3 API server (moto's server mode, a separate process on 127.0.0.1).

Fake credentials in the environment, the endpoint from AWS_ENDPOINT_URL or a job's `storage` section; the
end-to-end cases run the `mitoseg` commands as a user does and compare with the same runs on local files.
Also here: removing URL credentials from provenance, logs and printed commands.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import em_like, write_raw

from pipeline import storage
from pipeline.config.storage import StorageConfig
from pipeline.errors import ConfigError
from pipeline.volumes import VolumeMeta, create_volume, open_volume, parse_volume_url

# Set by the fixture; cleared so that nothing of the machine's own AWS set-up leaks into a test.
_AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


@pytest.fixture(autouse=True)
def _restore_what_configure_sets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`storage.configure` writes os.environ: every test starts without what an earlier one set, and the whole
    environment is put back after it (monkeypatch alone does not undo a variable it found absent)."""
    saved = dict(os.environ)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", *storage.CHECKSUM_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


REDACTIONS = [
    ("zarr://s3://AKIAEXAMPLE:se/cr+et@bucket/em.zarr/raw", "zarr://s3://bucket/em.zarr/raw"),
    ("precomputed://https://user:pw@host.org/layer", "precomputed://https://host.org/layer"),
    ("https://TOKEN@github.com/x", "https://github.com/x"),
    ("http://u:123@h/x", "http://h/x"),
    (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AK%2F1&X-Amz-Signature=abc&x=1",
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&x=1",
    ),
    (
        "https://storage.googleapis.com/b/o?X-Goog-Signature=f00",
        "https://storage.googleapis.com/b/o?X-Goog-Signature=REDACTED",
    ),
    (
        "https://acct.blob.core.windows.net/c/b?sv=2024&sig=abc%3D",
        "https://acct.blob.core.windows.net/c/b?sv=2024&sig=REDACTED",
    ),
    (
        "https://h/x?token=abc&X-Amz-Security-Token=t#frag",
        "https://h/x?token=REDACTED&X-Amz-Security-Token=REDACTED#frag",
    ),
    ("https://h/x?key=AIza&keyframe=1&monkey=3", "https://h/x?key=REDACTED&keyframe=1&monkey=3"),
    ("mitoseg view 'zarr://s3://K:S@b/v' out.zarr/p", "mitoseg view 'zarr://s3://b/v' out.zarr/p"),
    # nothing to remove: a port, an @ in a path, nested schemes, plain paths
    ("https://host:8080/a@2x.png", "https://host:8080/a@2x.png"),
    ("zarr://s3://bucket/a:b/c", "zarr://s3://bucket/a:b/c"),
    ("file:///data/run@1/em.zarr", "file:///data/run@1/em.zarr"),
    ("data/em.zarr/raw", "data/em.zarr/raw"),
]


@pytest.mark.parametrize(("text", "expected"), REDACTIONS)
def test_redact_removes_user_info_and_signed_query_values(text: str, expected: str) -> None:
    assert storage.redact(text) == expected


def test_log_lines_and_printed_commands_are_redacted() -> None:
    from pipeline.viewing import view_command

    stream = io.StringIO()
    logger = logging.getLogger("test_s3.redaction")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        storage.redact_logs(logger)
        storage.redact_logs(logger)  # installed once however often it is asked for
        logger.warning("cannot open %s", "https://user:hunter2@host/v?sig=xyz")
        assert stream.getvalue() == "cannot open https://host/v?sig=REDACTED\n"
        try:
            raise OSError("403 for s3://KEY:hunter2@bucket/v")
        except OSError:
            logger.exception("failed")
        assert "s3://bucket/v" in stream.getvalue() and "hunter2" not in stream.getvalue()
        assert len(handler.filters) == 1
    finally:
        logger.removeHandler(handler)
    assert view_command(["https://u:hunter2@h/v", "data/p"]) == "mitoseg view https://h/v data/p"


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("minio.lab:9000", "must be an http:// or https:// URL"),
        ("http://KEY:SECRET@minio.lab:9000", "must not hold credentials"),
        ("https://minio.lab?region=x", "without a query"),
    ],
)
def test_storage_section_refuses_bad_endpoints(value: str, pattern: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=pattern):
        StorageConfig(s3_endpoint_url=value)
    assert StorageConfig(s3_endpoint_url="http://minio.lab:9000/").s3_endpoint_url == "http://minio.lab:9000"


def test_credentials_in_object_storage_urls_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError, match="give them as AWS_ACCESS_KEY_ID") as caught:
        parse_volume_url("zarr://s3://AKIAEXAMPLE:se/cret@bucket/em.zarr/raw")
    assert "AKIAEXAMPLE" not in str(caught.value) and "se/cret" not in str(caught.value)


def test_configure_sets_the_endpoint_and_fills_what_cloud_files_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    storage.configure()
    assert storage.s3_endpoint() is None and storage.storage_options("s3://b/v") == {}
    assert "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ  # AWS itself: botocore's defaults
    assert os.environ["AWS_SESSION_TOKEN"] == ""  # cloud-files 6 raises KeyError without one
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    assert storage.s3_endpoint() == "http://from-env:9000"
    storage.configure("http://from-config:9000")  # a job's storage section wins over the environment
    assert storage.s3_endpoint() == "http://from-config:9000"
    assert storage.storage_options("s3://b/v") == {"endpoint_url": "http://from-config:9000"}
    assert storage.storage_options("gs://b/v") == {}
    assert os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    assert storage.browser_location("s3://b/v.zarr/p") == "http://from-config:9000/b/v.zarr/p"
    assert storage.browser_location("gs://b/v") == "gs://b/v"


def test_gs_urls_reach_gcsfs(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gcsfs")
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})  # else it waits for a metadata server
    fs, path = storage.filesystem("gs://bucket/em.zarr")
    assert "gcs" in fs.protocol and path == "bucket/em.zarr"


# --- against the S3 server ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]
    """The environment of a `mitoseg` command that reaches the server (credentials only there)."""

    def bucket(self, name: str) -> str:
        fs, _ = storage.filesystem(f"s3://{name}")
        fs.mkdir(name)
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server in its own process on a free port, with fake credentials and AWS_ENDPOINT_URL set."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        home = tmp_path_factory.mktemp("home")
        with pytest.MonkeyPatch.context() as mp:
            for name in _AWS_VARIABLES:
                mp.delenv(name, raising=False)
            settings = {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
                "AWS_CONFIG_FILE": str(home / "config"),
                "CLOUD_FILES_DIR": str(home / "cloudfiles"),
                "CLOUD_VOLUME_DIR": str(home / "cloudvolume"),
            }
            for name, value in settings.items():
                mp.setenv(name, value)
            yield S3Server(endpoint, dict(os.environ))
    finally:
        server.terminate()
        server.wait(timeout=30)


META = VolumeMeta(shape=(16, 32, 48), dtype=np.dtype(np.uint8), chunks=(8, 16, 16), voxel_size_nm=(8.0, 4.0, 4.0))


@pytest.mark.parametrize("kind", ["zarr", "zarr2", "precomputed"])
def test_volumes_on_s3_write_read_and_keep_provenance(s3: S3Server, kind: str) -> None:
    bucket = s3.bucket(f"volumes-{kind}")
    data = em_like(META.shape)[None]
    url = f"{kind}://s3://{bucket}/v"
    created = create_volume(url, META)
    created.write(META.roi, data)
    created.set_provenance({"complete": True, "input": "x"})
    again = open_volume(url)
    assert again.meta.shape == META.shape and again.meta.voxel_size_nm == META.voxel_size_nm
    assert np.array_equal(again.read(META.roi), data)
    assert again.provenance["complete"] is True
    fs, _ = storage.filesystem(f"s3://{bucket}")
    assert fs.ls(bucket)  # the objects are in the server's bucket, not on a local disk


def test_storage_section_endpoint_reaches_the_server_without_the_environment(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3.bucket("from-config")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.s3_endpoint() is None
    storage.configure(StorageConfig(s3_endpoint_url=s3.endpoint).s3_endpoint_url)
    write_raw(f"zarr://s3://{bucket}/em.zarr/raw", em_like(META.shape))
    assert open_volume(f"zarr://s3://{bucket}/em.zarr/raw").meta.shape == META.shape


def _worker_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _read_sum(url: str) -> int:
    volume = open_volume(url)
    return int(volume.read(volume.meta.roi).astype(np.int64).sum())


def _log_a_secret_url() -> None:
    logging.getLogger("distributed.worker").warning("reading %s", "https://reader:hunter2@host/v")


@pytest.mark.cluster
def test_workers_of_a_running_cluster_get_the_clients_endpoint(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """External workers do not share the client's environment: dask_client hands them the endpoint (and
    redacts their log lines)."""
    from distributed import Client, LocalCluster

    from pipeline.cluster import dask_client
    from pipeline.config.cluster import AddressClusterConfig

    bucket = s3.bucket("external-workers")
    url = write_raw(f"zarr://s3://{bucket}/em.zarr/raw", em_like(META.shape))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as plain:
            assert set(plain.run(_worker_endpoint).values()) == {None}  # started without it
        storage.configure(s3.endpoint)
        with dask_client(AddressClusterConfig(kind="address", address=cluster.scheduler_address)) as client:
            assert set(client.run(_worker_endpoint).values()) == {s3.endpoint}
            assert client.submit(_read_sum, url).result() == _read_sum(url)
            client.run(_log_a_secret_url)
    logged = capfd.readouterr().err  # the worker processes write to this process's stderr
    assert "reading https://host/v" in logged and "hunter2" not in logged


def test_provenance_records_the_input_without_its_credentials(s3: S3Server, tiny_checkpoint: Path, tmp_path) -> None:
    """An http input named with user info (the S3 server serves it anonymously): provenance drops the user info."""
    from pipeline.config.segment import SegmentConfig
    from pipeline.segment import prepare

    bucket = s3.bucket("provenance")
    write_raw(f"zarr://s3://{bucket}/em.zarr/raw", em_like(META.shape))
    secret_input = f"zarr://http://reader:hunter2@{s3.endpoint[len('http://') :]}/{bucket}/em.zarr/raw"
    out = f"zarr://file://{tmp_path}/p.zarr/probs"
    prepare(SegmentConfig(input=secret_input, output=[out], checkpoint=str(tiny_checkpoint), block_size=(16, 32, 48)))
    record = open_volume(out).provenance
    assert record["input"] == f"zarr://http://{s3.endpoint[len('http://') :]}/{bucket}/em.zarr/raw"
    assert "hunter2" not in json.dumps(record)


# --- the commands end to end on S3 ----------------------------------------------------------------------------
# The S3 side runs `mitoseg` as a user does (its own LocalCluster, endpoint and credentials from the environment);
# the local reference runs in this process on the module's Dask client, with the CLI worker's torch thread count
# so that both agree bit for bit.

DEMO_SHAPE = (16, 64, 256)
DEMO_BLOCKS = 4  # block 16,64,64


def mitoseg(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env)


def _segment_args(raw: str, outputs: list[str], checkpoint: Path) -> list[str]:
    args = ["segment", "--input", raw, "--checkpoint", str(checkpoint), "--block-size", "16,64,64", "--workers", "1"]
    for out in outputs:
        args += ["--output", out]
    return args


def _segment_here(raw: str, outputs: list[str], checkpoint: Path, client: Any) -> Any:
    from pipeline.config.segment import SegmentConfig
    from pipeline.segment import segment

    config = SegmentConfig(input=raw, output=outputs, checkpoint=str(checkpoint), block_size=(16, 64, 64))
    return segment(config, client=client, progress=False).run


def _read(url: str) -> np.ndarray:
    volume = open_volume(url)
    return volume.read(volume.meta.roi)


@dataclass(frozen=True)
class Demo:
    local: Path
    bucket: str


@pytest.fixture(scope="module")
def demo(s3: S3Server, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, client: Any) -> Iterator[Demo]:
    """The synthetic demo volume and its truth made locally and uploaded, segmented on S3 and on local files."""
    from pipeline.config.synthetic import SyntheticVolume
    from pipeline.synthetic import write_synthetic

    local = tmp_path_factory.mktemp("demo")
    spec = SyntheticVolume(shape=DEMO_SHAPE, seed=3, voxel_size_nm=(8.0, 8.0, 8.0))
    write_synthetic(spec, f"zarr://file://{local}/em.zarr/raw", f"zarr://file://{local}/em.zarr/label", (16, 64, 32))
    bucket = s3.bucket("demo")
    fs, _ = storage.filesystem(f"s3://{bucket}")
    fs.put(str(local / "em.zarr"), f"{bucket}/em.zarr", recursive=True)
    on_s3 = [f"zarr://s3://{bucket}/out.zarr/probs", f"precomputed://s3://{bucket}/out-precomputed"]
    run = mitoseg(s3.env, *_segment_args(f"zarr://s3://{bucket}/em.zarr/raw", on_s3, tiny_checkpoint))
    assert run.returncode == 0, run.stderr
    assert f"{DEMO_BLOCKS} block(s) computed" in run.stdout
    assert "view: mitoseg view zarr://s3://demo/em.zarr/raw zarr://s3://demo/out.zarr/probs" in run.stdout
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MITOSEG_TORCH_THREADS", str(os.cpu_count() or 1))  # what the CLI's one local worker gets
        on_disk = [f"zarr://file://{local}/out.zarr/probs", f"precomputed://file://{local}/out-precomputed"]
        assert _segment_here(f"{local}/em.zarr/raw", on_disk, tiny_checkpoint, client).ok
        yield Demo(local, bucket)


@pytest.mark.slow
def test_segment_on_s3_equals_the_run_on_local_files(demo: Demo) -> None:
    for kind, name in (("zarr", "out.zarr/probs"), ("precomputed", "out-precomputed")):
        on_s3 = _read(f"{kind}://s3://{demo.bucket}/{name}")
        assert on_s3.any() and np.array_equal(on_s3, _read(f"{kind}://file://{demo.local}/{name}")), kind
    assert open_volume(f"zarr://s3://{demo.bucket}/out.zarr/probs").provenance["complete"] is True
    fs, _ = storage.filesystem(f"s3://{demo.bucket}")
    assert fs.find(f"{demo.bucket}/out.zarr/probs.mitoseg")  # the run's state (done-records) is on S3 too


@pytest.mark.slow
def test_run_failing_part_way_on_s3_resumes_to_the_same_output(
    s3: S3Server, demo: Demo, tiny_checkpoint: Path, client: Any, tmp_path: Path
) -> None:
    """A damaged input chunk fails the blocks that read it; restored, `mitoseg segment` computes only those."""
    fs, _ = storage.filesystem(f"s3://{demo.bucket}")
    chunks = sorted(p for p in fs.find(f"{demo.bucket}/em.zarr/raw/s0") if not p.endswith("zarr.json"))
    last = chunks[-1]  # the chunk at the far x end: read by the last block(s) only
    good = fs.cat_file(last)
    raw, out = f"zarr://s3://{demo.bucket}/em.zarr/raw", f"zarr://s3://{demo.bucket}/resumed.zarr/probs"
    fs.pipe_file(last, b"damaged")
    try:
        first = _segment_here(raw, [out], tiny_checkpoint, client)
    finally:
        fs.pipe_file(last, good)
    assert 0 < first.failed < DEMO_BLOCKS and first.completed == DEMO_BLOCKS - first.failed
    # the resumed run finds the server through its job file's storage section alone
    job = tmp_path / "job.yaml"
    job.write_text(f"storage: {{s3_endpoint_url: '{s3.endpoint}'}}\n")
    env = {k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"}
    again = mitoseg(env, "segment", str(job), *_segment_args(raw, [out], tiny_checkpoint)[1:])
    assert again.returncode == 0, again.stderr
    assert f"{first.failed} block(s) computed, {first.completed} skipped" in again.stdout
    assert np.array_equal(_read(out), _read(f"zarr://file://{demo.local}/out.zarr/probs"))


@pytest.mark.slow
def test_instances_evaluate_and_view_state_read_from_s3(s3: S3Server, demo: Demo, tmp_path: Path, client: Any) -> None:
    import yaml

    from pipeline.config.instances import InstancesConfig
    from pipeline.evaluation import evaluate_all
    from pipeline.instances.run import run_instances

    probs = f"zarr://s3://{demo.bucket}/out.zarr/probs"
    labels = f"zarr://s3://{demo.bucket}/seg.zarr/mitochondria"
    # the tiny random network is no mitochondria detector: a threshold from its own output gives objects
    threshold = float(np.percentile(_read(probs)[0], 80)) / 255
    decode = {"method": "components", "threshold": threshold, "seed_threshold": 0.0, "min_size": 8}
    job = tmp_path / "instances.yaml"
    job.write_text(yaml.safe_dump({"decode": decode, "block_size": [16, 64, 64]}))
    run = mitoseg(s3.env, "instances", str(job), "--input", probs, "--output", labels, "--table", f"{tmp_path}/s3.csv")
    assert run.returncode == 0, run.stderr
    local_labels = f"zarr://file://{tmp_path}/seg.zarr/mitochondria"
    local = InstancesConfig(
        input=f"zarr://file://{demo.local}/out.zarr/probs",
        output=local_labels,
        table=f"{tmp_path}/local.csv",
        block_size=(16, 64, 64),
        decode=decode,
    )
    assert run_instances(local, client, progress=False).num_objects > 1
    assert np.array_equal(_read(labels), _read(local_labels))
    assert (tmp_path / "s3.csv").read_text() == (tmp_path / "local.csv").read_text()

    truth = f"zarr://s3://{demo.bucket}/em.zarr/label"
    scored = mitoseg(s3.env, "evaluate", "--prediction", probs, "--truth", truth, "--json")
    assert scored.returncode == 0, scored.stderr
    here = f"zarr://file://{demo.local}"
    assert json.loads(scored.stdout) == evaluate_all(
        f"{here}/out.zarr/probs", f"{here}/em.zarr/label", None, "auto", None
    )

    import boto3

    public = {
        "Effect": "Allow",
        "Principal": "*",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{demo.bucket}/*",
    }
    policy = json.dumps({"Version": "2012-10-17", "Statement": [public]})
    boto3.client("s3").put_bucket_policy(Bucket=demo.bucket, Policy=policy)  # browsers read without credentials
    state = tmp_path / "state.json"
    out = mitoseg(s3.env, "view", f"zarr://s3://{demo.bucket}/em.zarr/raw", probs, labels, "--state", str(state))
    assert out.returncode == 0, out.stderr
    sources = [layer["source"] for layer in json.loads(state.read_text())["layers"]]
    urls = [s if isinstance(s, str) else s["url"] for one in sources for s in (one if isinstance(one, list) else [one])]
    base = f"{s3.endpoint}/{demo.bucket}/"
    assert len(urls) >= 3 and all(base in u for u in urls), urls  # Neuroglancer cannot be told the endpoint
    for u in urls[:2]:  # what Neuroglancer fetches first: the volumes' metadata, over plain http
        with urllib.request.urlopen(f"{u.split('://', 1)[1]}/zarr.json", timeout=10) as reply:
            assert json.load(reply)["zarr_format"] == 3


@pytest.mark.slow
def test_a_killed_run_on_s3_resumes_to_the_same_output(s3: S3Server, demo: Demo, tiny_checkpoint: Path) -> None:
    """`mitoseg segment` SIGKILLed (client and workers) with some blocks on S3, then run again: it computes only
    the rest, from its done-records on S3, and the output equals the run on local files."""
    import signal

    fs, _ = storage.filesystem(f"s3://{demo.bucket}")
    raw, out = f"zarr://s3://{demo.bucket}/em.zarr/raw", f"zarr://s3://{demo.bucket}/killed.zarr/probs"
    command = [sys.executable, "-m", "pipeline", *_segment_args(raw, [out], tiny_checkpoint)]
    slow = {  # every block waits first, so that the kill lands mid-run
        "DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{Path(__file__).with_name("worker_faults_preload.py")}"]',
        "MITOSEG_TEST_BLOCK_DELAY_S": "1",
    }
    first = subprocess.Popen(command, env={**s3.env, **slow}, start_new_session=True, stdout=subprocess.DEVNULL)

    def records() -> int:
        fs.invalidate_cache()
        return len(fs.find(f"{demo.bucket}/killed.zarr/probs.mitoseg/segment"))

    deadline = time.monotonic() + 240
    while records() == 0 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the run ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    again = mitoseg(s3.env, *_segment_args(raw, [out], tiny_checkpoint))
    assert again.returncode == 0, again.stderr
    computed = int(again.stdout.split(" block(s) computed")[0].rsplit(" ", 1)[-1])
    assert 0 < computed < DEMO_BLOCKS  # the blocks recorded on S3 before the kill were not computed again
    assert np.array_equal(_read(out), _read(f"zarr://file://{demo.local}/out.zarr/probs"))
