"""Real servers on loopback for the network tests and bench/bench_network.py: an S3 server (moto), an HTTP file
server with range requests, and a TCP proxy that adds latency and injects faults between a client and either.

Every server binds 127.0.0.1 on a free port chosen by the system and is stopped by whoever started it.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """moto's S3 server in a thread; `endpoint` is its http://127.0.0.1:PORT address."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_KEYS["AWS_DEFAULT_REGION"],
        )

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")

    def stop(self) -> None:
        self._server.stop()


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """GET with a single `Range: bytes=a-b` (206), HEAD with Content-Length; what fsspec's HTTP reader needs."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        data = path.read_bytes()
        start, stop = 0, len(data)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and data:
            first, last = match.groups()
            if first:
                start, stop = int(first), min(int(last) + 1 if last else len(data), len(data))
            else:
                start = max(len(data) - int(last), 0)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        import io

        return io.BytesIO(data[start:stop])


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # a connection the proxy reset on purpose is not the server's error
        pass


class HTTPFileServer:
    """Serves `folder` over HTTP with range requests; `url` is its http://127.0.0.1:PORT address."""

    def __init__(self, folder: Path) -> None:
        handler = lambda *a, **k: _RangeHandler(*a, directory=str(folder), **k)  # noqa: E731
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Fault:
    """What the proxy does to one request: `kind` is one of

    * ``drop``: forward the response's first `after_bytes` bytes, then close the connection (FIN);
    * ``reset``: the same, then reset the connection (RST);
    * ``stall``: hold the response for `seconds`, then forward it;
    * ``status``: answer `status` itself (503 SlowDown, 500, 403 AccessDenied) without asking the server.

    It applies to the next request whose first line contains `match` (any request if empty).
    """

    kind: str
    after_bytes: int = 0
    seconds: float = 0.0
    status: int = 503
    match: bytes = b""


_REASONS = {403: ("Forbidden", "AccessDenied"), 500: ("Internal Server Error", "InternalError")}
_REASONS[503] = ("Slow Down", "SlowDown")


def _status_response(status: int, request: bytes) -> bytes:
    reason, code = _REASONS[status]
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{reason}</Message></Error>'
    )
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    # the answer to a HEAD request has the headers of the body it does not send
    return (head if request.startswith(b"HEAD ") else head + body).encode()


class FaultProxy:
    """A TCP proxy on loopback in front of `upstream` (host:port): each request (the client's bytes after a
    response) waits `latency` seconds before it is forwarded, and takes the next queued `Fault`, if any.

    `down()` makes every request fail (a 503, or a closed connection) until `up()`; `requests` counts requests
    and `faults_done` the faults applied; `pending()` lists those not met yet. `most_waiting` is the largest
    number of requests whose first line contains `watch` that waited out their latency at the same time (with a
    latency much longer than the server's answer, the most such requests that were in flight together)."""

    def __init__(self, upstream: str, latency: float = 0.0) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host.removeprefix("http://"), int(port))
        self.latency = latency
        self.faults: list[Fault] = []
        self.requests = 0
        self.faults_done = 0
        self._down: Fault | None = None
        self.watch = b""
        self.most_waiting = 0
        self._waiting = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self.faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def down(self, how: Fault | None = None) -> None:
        self._down = how or Fault("status", status=503)

    def up(self) -> None:
        self._down = None

    def stop(self) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _wait(self, request: bytes) -> None:
        watched = self.watch in request.split(b"\r\n", 1)[0]
        if watched:
            with self._lock:
                self._waiting += 1
                self.most_waiting = max(self.most_waiting, self._waiting)
        try:
            time.sleep(self.latency)
        finally:
            if watched:
                with self._lock:
                    self._waiting -= 1

    def _next_fault(self, request: bytes) -> Fault | None:
        first_line = request.split(b"\r\n", 1)[0]
        with self._lock:
            self.requests += 1
            if self._down is not None:
                return self._down
            for i, fault in enumerate(self.faults):
                if fault.match in first_line:
                    self.faults_done += 1
                    return self.faults.pop(i)
            return None

    def _serve(self, client: socket.socket) -> None:
        server = None
        try:
            while True:
                request = client.recv(65536)
                if not request:
                    return
                if self.latency:
                    self._wait(request)
                fault = self._next_fault(request)
                if fault is not None and fault.kind == "status":
                    client.sendall(_status_response(fault.status, request))
                    return
                if server is None:
                    server = socket.create_connection(self.upstream)
                server.sendall(request)
                if not self._relay_response(client, server, fault):
                    return
        except OSError:
            return
        finally:
            client.close()
            if server is not None:
                server.close()

    def _relay_response(self, client: socket.socket, server: socket.socket, fault: Fault | None) -> bool:
        """Forward the server's answer until the client speaks again; False when the connection is over."""
        if fault is not None and fault.kind == "stall":
            time.sleep(fault.seconds)
        sent = 0
        while True:
            ready = _readable(client, server)
            if client in ready:
                # the client sent more (a request body, or its next request): pass a body on, else return
                data = client.recv(65536, socket.MSG_PEEK)
                if not data:
                    return False
                if server not in ready and _looks_like_request(data):
                    return True
                server.sendall(client.recv(65536))
            if server in ready:
                data = server.recv(65536)
                if not data:
                    return False
                if (
                    fault is not None
                    and fault.kind in ("drop", "reset")
                    and sent + len(data) >= fault.after_bytes
                ):
                    client.sendall(data[: max(fault.after_bytes - sent, 0)])
                    if fault.kind == "reset":
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return False
                client.sendall(data)
                sent += len(data)


def _readable(*sockets: socket.socket) -> list[socket.socket]:
    import select

    ready, _, _ = select.select(list(sockets), [], [], 30)
    return ready


_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ", b"OPTIONS ")


def _looks_like_request(data: bytes) -> bool:
    return data.startswith(_METHODS)


def free_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment without any AWS setting of the user's, plus the test keys and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(S3_KEYS)
    env.update(extra or {})
    return env
