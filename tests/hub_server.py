"""A loopback stand-in for the Hugging Face Hub, for tests: the real `huggingface_hub` client talks HTTP to it.

It keeps model repos in memory, with every commit's full snapshot, and speaks this subset of the Hub API:

    GET    /api/whoami-v2                                   any bearer token is user "tester"
    POST   /api/validate-yaml                               accepts every model card
    POST   /api/repos/create                                the repo starts with one commit (.gitattributes)
    DELETE /api/repos/delete
    GET    /api/models/{repo_id}                            model info of "main": sha, siblings
    GET    /api/models/{repo_id}/revision/{revision}
    GET    /api/models/{repo_id}/tree/{revision}[/{path}]   ?recursive=true|false, one page
    POST   /api/models/{repo_id}/paths-info/{revision}      form field `paths`, repeated
    POST   /api/models/{repo_id}/preupload/{revision}       every file is a "regular" upload (never LFS or Xet)
    POST   /api/models/{repo_id}/commit/{revision}          NDJSON: header, file (inline base64), deletedFile,
                                                            deletedFolder; every commit gets a new 40-hex sha
    GET    /{repo_id}/resolve/{revision}/{path}             the file, with ETag (git blob sha1), X-Repo-Commit
    HEAD   /{repo_id}/resolve/{revision}/{path}             and Content-Length

A revision is a branch name or a commit sha (old commits stay readable). Errors answer as the Hub does, JSON
`{"error": ...}` plus `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) and `X-Error-Message`,
so that the client raises its own exceptions. Writes need an `Authorization: Bearer ...` header. Model repos only; no
LFS, Xet, pull requests, tags, branches other than "main", or pagination.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file (what the Hub sends as the ETag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class HubError(Exception):
    """An error answer: HTTP status, message, and the Hub's `X-Error-Code` if it has one."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    summary: str
    date: str
    files: Mapping[str, bytes]  # the whole snapshot: path in repo -> content


@dataclass
class Repo:
    repo_id: str
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha

    def resolve(self, revision: str) -> Commit:
        sha = self.branches.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json(value: object, status: int = 200) -> Response:
    return Response(status, json.dumps(value).encode())


class HubState:
    """All repos; the server's handler threads go through `lock`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self._counter = itertools.count()

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def commit(self, repo: Repo, branch: str, summary: str, files: Mapping[str, bytes]) -> Commit:
        parent = repo.branches.get(branch)
        seed = f"{repo.repo_id}\0{parent}\0{summary}\0{next(self._counter)}\0{_now()}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, summary, _now(), dict(files))
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit


def _file_entry(path: str, data: bytes) -> dict:
    return {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": path}


def _folder_entry(commit: Commit, path: str) -> dict:
    # Not git's tree hash, but a stable 40-hex id of this folder at this commit.
    return {"type": "directory", "oid": hashlib.sha1(f"{commit.sha}:{path}".encode()).hexdigest(), "path": path}


def _is_folder(commit: Commit, path: str) -> bool:
    return any(name.startswith(path + "/") for name in commit.files)


def _tree(commit: Commit, folder: str, recursive: bool) -> list[dict]:
    """The entries under `folder` ("" for the root): its files and folders, or everything below it if recursive."""
    prefix = folder + "/" if folder else ""
    entries: dict[str, dict] = {}
    for path, data in commit.files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            sub_folder = prefix + "/".join(parts[:depth])
            entries[sub_folder] = _folder_entry(commit, sub_folder)
        if recursive or len(parts) == 1:
            entries[path] = _file_entry(path, data)
    return [entries[path] for path in sorted(entries)]


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.state = HubState()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<revision>[^/]+)"


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length
    timeout = 60  # close idle connections
    server: HubServer
    query: dict[str, str]  # the request's query parameters (the last value of each)

    def setup(self) -> None:
        super().setup()
        # Without this, Nagle's algorithm and delayed ACKs cost ~40 ms per request.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet; unknown routes and server bugs still go to stderr

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_DELETE = do_PUT = do_GET

    # -- plumbing --

    def _dispatch(self) -> None:
        body = self._read_body()  # always, even on errors: an unread body would corrupt the next request
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        try:
            with self.server.state.lock:
                response = self._route(url.path, body)
        except HubError as error:
            message = error.message.encode("ascii", "backslashreplace").decode()  # headers are latin-1
            headers = {"X-Error-Message": message, **error.headers}
            if error.code is not None:
                headers["X-Error-Code"] = error.code
            response = Response(error.status, json.dumps({"error": error.message}).encode(), headers=headers)
        except Exception as error:  # a bug here: say so loudly instead of hanging the client
            traceback.print_exc(file=sys.stderr)
            response = Response(500, json.dumps({"error": f"hub_server: {error!r}"}).encode())
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _route(self, path: str, body: bytes) -> Response:
        routes: list[tuple[str, str, Callable[..., Response]]] = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/repos/create", self._create_repo),
            ("DELETE", r"/api/repos/delete", self._delete_repo),
            ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", self._model_info),
            ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?", self._list_tree),
            ("POST", rf"/api/models/{_REPO}/paths-info/{_REV}", self._paths_info),
            ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/{_REV}", self._commit),
            ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", self._resolve),
            ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", self._resolve),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                args = {name: unquote(value) for name, value in match.groupdict().items() if value is not None}
                return handler(body, **args)
        print(f"hub_server: no route for {self.command} {self.path}", file=sys.stderr)
        raise HubError(404, f"hub_server does not implement {self.command} {path}")

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo_id(self, payload: dict) -> str:
        if payload.get("type", "model") != "model":
            raise HubError(400, "hub_server only has model repos")
        return f"{payload.get('organization') or USER}/{payload['name']}"

    # -- endpoints --

    def _whoami(self, body: bytes) -> Response:
        self._require_token()
        auth = {"type": "access_token", "accessToken": {"displayName": "test token", "role": "write"}}
        return _json({"type": "user", "name": USER, "fullname": "Test User", "orgs": [], "auth": auth})

    def _validate_yaml(self, body: bytes) -> Response:
        return _json({"errors": [], "warnings": []})

    def _create_repo(self, body: bytes) -> Response:
        self._require_token()
        state, repo_id = self.server.state, self._repo_id(json.loads(body))
        url = f"{self.server.url}/{repo_id}"
        if repo_id in state.repos:
            return _json({"error": "You already created this model repo", "url": url}, status=409)
        repo = state.repos[repo_id] = Repo(repo_id, _now())
        state.commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES})
        return _json({"url": url, "name": repo_id})

    def _delete_repo(self, body: bytes) -> Response:
        self._require_token()
        repo_id = self._repo_id(json.loads(body))
        self.server.state.repo(repo_id)
        del self.server.state.repos[repo_id]
        return _json({})

    def _model_info(self, body: bytes, repo: str, revision: str = "main") -> Response:
        model = self.server.state.repo(repo)
        commit = model.resolve(revision)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = [
            {"rfilename": path, **({"size": len(data), "blobId": git_blob_sha(data)} if blobs else {})}
            for path, data in sorted(commit.files.items())
        ]
        return _json(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": model.created_at,
                "private": False,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _list_tree(self, body: bytes, repo: str, revision: str, path: str = "") -> Response:
        commit = self.server.state.repo(repo).resolve(revision)
        folder = path.strip("/")
        if folder and not _is_folder(commit, folder):
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        return _json(_tree(commit, folder, recursive=self.query.get("recursive", "").lower() in ("1", "true")))

    def _paths_info(self, body: bytes, repo: str, revision: str) -> Response:
        commit = self.server.state.repo(repo).resolve(revision)
        entries = []
        for path in parse_qs(body.decode()).get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                entries.append(_file_entry(path, commit.files[path]))
            elif _is_folder(commit, path):
                entries.append(_folder_entry(commit, path))
        return _json(entries)

    def _preupload(self, body: bytes, repo: str, revision: str) -> Response:
        self._require_token()
        commit = self.server.state.repo(repo).resolve(revision)
        files = []
        for file in json.loads(body)["files"]:
            existing = commit.files.get(file["path"])
            oid = None if existing is None else git_blob_sha(existing)  # lets the client skip unchanged files
            files.append({"path": file["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return _json({"files": files})

    def _commit(self, body: bytes, repo: str, revision: str) -> Response:
        self._require_token()
        state = self.server.state
        model = state.repo(repo)
        if revision not in model.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        if self.query.get("create_pr"):
            raise HubError(400, "hub_server does not do pull requests")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
        head = model.resolve(revision)
        if header.get("parentCommit") not in (None, head.sha):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(folder)}
            else:
                raise HubError(400, f"hub_server does not accept commit operation {key!r} (files go inline)")
        commit = state.commit(model, revision, header.get("summary", ""), files)
        commit_url = f"{self.server.url}/{repo}/commit/{commit.sha}"
        return _json({"success": True, "commitOid": commit.sha, "commitUrl": commit_url, "pullRequestUrl": None})

    def _resolve(self, body: bytes, repo: str, revision: str, path: str) -> Response:
        commit = self.server.state.repo(repo).resolve(revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {"ETag": f'"{git_blob_sha(data)}"', "X-Repo-Commit": commit.sha, "Accept-Ranges": "none"}
        return Response(200, data, "application/octet-stream", headers)


@contextmanager
def serve_hub() -> Iterator[str]:
    """Run a fresh, empty loopback Hub in a background thread; yield its endpoint URL (for `HF_ENDPOINT`)."""
    server = HubServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="hub_server", daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
