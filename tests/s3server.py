"""A real S3 API on this machine: moto's server mode in its own process on 127.0.0.1.

raysl's storage code talks to it as to any bucket: pyarrow's S3 filesystem finds it through
AWS_ENDPOINT_URL, the test credentials through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager

from raysl.train.local_world import free_port

ACCESS_KEY = "raysl-test-key"
SECRET_KEY = "raysl-test-secret-do-not-log"


class S3Server:
    """moto's S3 server: `start()`, `stop()`, `env` (what a process needs to reach it) and
    `bucket()` (a new, empty bucket; returns its s3:// URI)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask a cloud's metadata service for credentials
        }
        self.proc: subprocess.Popen | None = None
        self.recording_file = os.path.join(tempfile.mkdtemp(prefix="moto_"), "recording.jsonl")

    def start(self, timeout: float = 60.0) -> "S3Server":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "MOTO_RECORDER_FILEPATH": self.recording_file},  # see `recording`
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on {self.endpoint}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def filesystem(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(
            endpoint_override=self.endpoint,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region="us-east-1",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def bucket(self, prefix: str = "lake") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def put_env(self) -> dict:
        """Set `env` in this process (its children inherit it); returns what it replaced."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        return saved

    def _api(self, path: str, data: bytes = b"") -> bytes:
        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/{path}", data=data, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    @contextmanager
    def recording(self):
        """The S3 requests the server answers inside the block, as (method, bucket/key, query)
        tuples appended to the yielded list when the block ends (moto's request recorder)."""
        requests: list[tuple[str, str, str]] = []
        self._api("recorder/reset-recording")
        self._api("recorder/start-recording")
        try:
            yield requests
        finally:
            self._api("recorder/stop-recording")
            with open(self.recording_file) as f:
                for line in f:
                    url = urllib.parse.urlsplit(json.loads(line)["url"])
                    requests.append((json.loads(line)["method"], urllib.parse.unquote(url.path).lstrip("/"), url.query))

    @contextmanager
    def credentials_checked(self):
        """Inside the block the server checks every request's credentials, as a cloud's S3 does
        (by default moto accepts any). Yields the access key id of a user it knows (moto's IAM):
        with any secret key but that user's, a request is refused."""
        import boto3

        self._api("reset-auth", b"2")  # the next two requests (the user and its key) are not checked
        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        user = f"raysl-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
        try:
            yield key
        finally:
            self._api("reset-auth", b"inf")


class CutProxy:
    """A TCP proxy from 127.0.0.1:`port` to the S3 server, for cutting the network to the
    bucket without losing the server's state: `cut()` closes every open connection and
    refuses new ones, `restore()` lets them through again. `endpoint` is what a process's
    AWS_ENDPOINT_URL names to go through it."""

    def __init__(self, target_port: int):
        import threading

        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._open.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _reset(s)
                with self._lock:
                    self._conns.discard(s)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            _reset(s)

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.cut()
        self._listener.close()


def _reset(s: socket.socket) -> None:
    """Close with a TCP reset, as a network cut shows to the other side."""
    import struct

    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()
