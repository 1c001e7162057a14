"""A Hugging Face-compatible hub on loopback, for the weight-fetching tests.

It answers what `huggingface_hub.hf_hub_download` asks of a hub: `HEAD` and `GET`
`/{org}/{repo}/resolve/{revision}/{filename}` with the headers the real hub sends (X-Repo-Commit,
an ETag that is the file's sha256 for large files and its git blob sha1 for small ones,
Content-Length, Accept-Ranges), byte ranges for resumed downloads (206, Content-Range), and
404 with X-Error-Code: EntryNotFound for a file the repo lacks. Every request is recorded, so a
test can count the downloads. Faults on demand: `corrupt` (serve other bytes than the metadata
describes), `drop_after` (cut the first `drop_gets` GETs of a file after N bytes, as a lost connection does),
`ignore_range` (answer a resumed GET with the whole file, as some proxies do).
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from dataclasses import dataclass, field

from .conftest import free_ports

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_FROM = 1024  # files at least this big are "LFS" files: sha256 ETag, as on the hub


@dataclass
class Request:
    method: str
    repo: str
    filename: str
    range: str | None


@dataclass
class HubServer:
    repos: dict[str, dict[str, bytes]]  # repo id -> file name -> content
    corrupt: set[str] = field(default_factory=set)  # file names served with other bytes
    drop_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes a cut GET sends
    drop_gets: int = 1  # how many GETs of such a file are cut
    ignore_range: bool = False
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self):
        (self.port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()

    def gets(self, filename: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.filename == filename]

    def __enter__(self) -> "HubServer":
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                parts = self.path.split("?")[0].strip("/").split("/")
                # org/repo/resolve/revision/filename
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._status(404, "RepoNotFound")
                repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
                with hub._lock:
                    hub.requests.append(Request(self.command, repo, filename, self.headers.get("Range")))
                    cut = body and filename in hub.drop_after and len(hub.gets(filename)) <= hub.drop_gets
                if repo not in hub.repos:
                    return self._status(404, "RepoNotFound")
                if filename not in hub.repos[repo]:
                    return self._status(404, "EntryNotFound")
                content = hub.repos[repo][filename]
                etag = etag_of(content)
                served = bytes(b ^ 0xFF for b in content) if filename in hub.corrupt else content
                start = 0
                rng = self.headers.get("Range")
                if body and rng and not hub.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(content) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.end_headers()
                if not body:
                    return
                if cut:
                    self.wfile.write(served[start:start + hub.drop_after[filename]])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection is lost mid-file
                    return
                self.wfile.write(served[start:])

            def _status(self, code: int, error: str):
                self.send_response(code)
                self.send_header("X-Error-Code", error)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def etag_of(content: bytes) -> str:
    """The hub's ETag: sha256 of an LFS file, the git blob sha1 of a small one."""
    if len(content) >= LFS_FROM:
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
