"""A local server that speaks the part of the Hugging Face hub's HTTP protocol that ``huggingface_hub`` uses to
download a snapshot, for the fetch stages' online tests (``HF_ENDPOINT`` pointed at it).

It serves model and dataset repos at pinned commits:

- ``GET /api/{models|datasets}/{repo}/revision/{revision}``: the repo's info at a branch or commit (``sha``,
  ``siblings``);
- ``GET /api/{models|datasets}/{repo}/tree/{commit}``: the file list, each with its size and git blob id, and
  for LFS files (``*.safetensors`` here, as on the hub) the sha256 and size of the content;
- ``HEAD``/``GET /[datasets/]{repo}/resolve/{revision}/{path}``: the file, with the hub's ``X-Repo-Commit``,
  ``ETag`` (sha256 for LFS files, git blob sha1 for the others) and ``Content-Length`` headers, and ``Range``
  requests answered with 206;
- errors as the hub answers them: ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``,
  ``GatedRepo`` (401 without a token, 403 with one that has no access).

Faults are queued per test (:meth:`HubServer.fault`): a status with headers, a connection dropped half way
through a file, altered bytes, or no answer at all; each applies to the next ``times`` requests it matches.
Every request is logged (method, path, Range header, status) for the tests to check what the client did.
"""

import dataclasses
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_PATTERN = re.compile(r".*\.safetensors$")


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Repo:
    kind: str  # "models" or "datasets"
    name: str
    commit: str
    files: dict  # {path in the repo: bytes}
    branches: tuple = ("main",)
    tokens: tuple | None = None  # gated: the tokens with access; None: public

    def entry(self, path):
        data = self.files[path]
        entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if LFS_PATTERN.fullmatch(path):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def etag(self, path):
        entry = self.entry(path)
        return entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]


@dataclasses.dataclass
class Fault:
    method: str  # "GET", "HEAD" or "*"
    path: str  # a regular expression the request path must match
    action: str  # "status", "drop", "alter" or "stall"
    times: int
    status: int = 500
    headers: dict = dataclasses.field(default_factory=dict)


def folder_files(folder, prefix=""):
    """``{path in the repo: bytes}`` of every file below ``folder``."""
    folder = Path(folder)
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class HubServer:
    def __init__(self):
        self.repos, self.faults, self.log = {}, [], []
        self.lock = threading.Lock()
        self.stop_stalling = threading.Event()
        handler = type("Handler", (HubHandler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop_stalling.set()
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo):
        self.repos[(repo.kind, repo.name)] = repo
        return repo

    def fault(self, method, path, action, times=1, **details):
        with self.lock:
            self.faults.append(Fault(method, path, action, times, **details))

    def take_fault(self, method, path):
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method in ("*", method) and re.search(fault.path, path):
                    fault.times -= 1
                    return fault
        return None

    def requests(self, method=None, path=""):
        with self.lock:
            return [r for r in self.log if (method in (None, r["method"])) and re.search(path, r["path"])]


class HubHandler(BaseHTTPRequestHandler):
    hub = None  # set on the subclass HubServer makes
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass  # the tests read hub.log instead

    def do_GET(self):
        self.answer("GET")

    def do_HEAD(self):
        self.answer("HEAD")

    def answer(self, method):
        path = self.path.split("?", 1)[0]
        fault = self.hub.take_fault(method, path)
        record = {"method": method, "path": path, "range": self.headers.get("Range"), "fault": fault and fault.action}
        with self.hub.lock:
            self.hub.log.append(record)
        if fault and fault.action == "stall":
            self.hub.stop_stalling.wait(60)
            self.close_connection = True
            return
        if fault and fault.action == "status":
            record["status"] = fault.status
            return self.send(fault.status, b"{}", {"Content-Type": "application/json", **fault.headers})
        status, headers, body = self.route(method, path)
        record["status"] = status
        if fault and fault.action == "alter" and status in (200, 206) and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if fault and fault.action == "drop" and status == 200 and method == "GET":
            return self.send_half(headers, body)
        self.send(status, body if method == "GET" else b"", headers, len(body))

    def send(self, status, body, headers, length=None):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def send_half(self, headers, body):
        """The full length announced, half the bytes sent, the connection closed: a link that dropped."""
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        time.sleep(0.1)
        self.close_connection = True

    def route(self, method, path):
        api = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
        if api:
            kind, name, what, revision = api.groups()
            repo, error = self.repo_at(kind, name, revision)
            if error:
                return error
            if what == "revision":
                siblings = [{"rfilename": p} for p in sorted(repo.files)]
                return self.json({"id": name, "sha": repo.commit, "siblings": siblings, "private": False})
            return self.json([repo.entry(p) for p in sorted(repo.files)])
        resolve = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve:
            prefix, name, revision, file = resolve.groups()
            repo, error = self.repo_at("datasets" if prefix else "models", name, revision)
            if error:
                return error
            if file not in repo.files:
                return self.error(404, "EntryNotFound", f"{file} does not exist")
            return self.file(repo, file)
        return self.error(404, None, "not a hub endpoint")

    def repo_at(self, kind, name, revision):
        repo = self.hub.repos.get((kind, name))
        if repo is None:
            return None, self.error(401, "RepoNotFound", "Repository not found")
        if repo.tokens is not None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in repo.tokens:
                status = 403 if token else 401
                return None, self.error(status, "GatedRepo", f"Access to {name} is restricted")
        if revision not in (repo.commit, *repo.branches):
            return None, self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, None

    def file(self, repo, path):
        data = repo.files[path]
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(path)}"', "Accept-Ranges": "bytes"}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            first = int(wanted[1])
            last = int(wanted[2]) if wanted[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            return 206, headers, data[first : last + 1]
        return 200, headers, data

    def json(self, data):
        return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()

    def error(self, status, code, message):
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        return status, headers, json.dumps({"error": message}).encode()
