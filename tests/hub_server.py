"""A localhost stand-in for the Hugging Face Hub's HTTP API, for tests that push with the real `huggingface_hub`.

    with FakeHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("me/model", private=True, exist_ok=True)
        api.upload_folder(repo_id="me/model", folder_path=out)
        assert hub.commits[-1]["files"] == {...}

or, for code that builds its own `HfApi()` (finetune/hub.py does), `hub.patch_client(monkeypatch)` points the
library's defaults here for one test.

What it answers is what huggingface_hub 2.x sends for whoami, create_repo, create_branch, list_repo_refs,
repo_info/model_info, list_repo_tree/list_repo_files, get_paths_info, upload_folder/upload_file/create_commit
(the preupload call, README.md's validate-yaml call, the NDJSON commit). The preupload answer puts every file in
"regular" mode, so the client sends each file base64-encoded inside the commit and never starts an LFS or Xet
transfer (those would need a storage server; an `lfsFile` line in a commit is refused with a 400).

Deliberate differences from the real Hub, to keep assertions exact:
- a new repository is empty (the Hub adds an initial commit with a `.gitattributes`);
- `.gitignore` rules sent with preupload are not applied (`shouldIgnore` is always false);
- any request carrying the right token may write to any namespace; pull requests are not implemented.
A request no handler knows gets a 404 with a JSON error and is listed in `hub.unhandled`, so a test that fails
because the client called something new says which call it was.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import tempfile
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
# /api/{type}s/{namespace}/{name}{rest}. The client sends a repo ID as given: one without a namespace (which the Hub
# would not accept either outside create_repo) lands in the unknown-endpoint 404.
REPO_API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+?)(/.*)?$")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class Headers(dict):
    """Request headers with case-insensitive lookup: clients differ in how they spell `Authorization`."""

    def __init__(self, items):
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __contains__(self, key):
        return super().__contains__(key.lower())

    def get(self, key, default=None):
        return super().get(key.lower(), default)


class Request(NamedTuple):
    """One request as received; a plain tuple too (method, path, headers, body). `path` keeps its query string."""

    method: str
    path: str
    headers: Headers
    body: bytes


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the client maps to an exception class."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_oid(data: bytes) -> str:
    # The oid git (and the Hub's preupload answer) gives a regular file; the client compares it with its own to
    # skip unchanged files, so it has to be the real algorithm.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The server and its state. Attributes a test reads (take `hub.lock` if a request may still be running):

    endpoint   "http://127.0.0.1:PORT", for `HfApi(endpoint=...)`
    token, user  the one token accepted (as `Authorization: Bearer <token>`) and the user it belongs to
    repos      repo_id -> {"private": bool, "type": "model", "branches": {branch: {path: bytes}},
               "heads": {branch: commit oid}, "oids": [every commit oid, oldest first]}
    commits    one dict per commit: repo_id, revision (branch), message, description, files {path: bytes} added or
               replaced by it, deleted [paths], oid
    requests   every request, as Request(method, path, headers, body), in arrival order
    unhandled  (method, path) of each request no handler knew (each answered 404)
    errors     (method, path, traceback) of each request this stand-in failed on (each answered 400)
    blocked    (host, port) of connections `patch_client` refused to open (anything not on this machine)
    """

    def __init__(self, token: str = "hf_fake_write_token", user: str = "fake-user"):
        self.token = token
        self.user = user
        self.repos: dict[str, dict[str, Any]] = {}
        self.commits: list[dict[str, Any]] = []
        self.requests: list[Request] = []
        self.unhandled: list[tuple[str, str]] = []
        self.blocked: list[tuple[str, Any]] = []
        self.errors: list[tuple[str, str, str]] = []
        self.lock = threading.RLock()
        # Files at every commit, so a revision given as a commit oid (repo_info, tree) resolves too.
        self._snapshots: dict[str, dict[str, bytes]] = {}
        self._counter = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeHub:
        # A handler class of its own per server, so two hubs in one test never share state.
        class Handler(_Handler):
            hub = self

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval so that leaving the `with` block doesn't wait half a second per test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ pointing the client here

    def patch_client(self, monkeypatch, *, with_token: bool = True, block_other_hosts: bool = True) -> None:
        """Make huggingface_hub's defaults point here for one test (monkeypatch undoes it all afterwards).

        huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_TELEMETRY and the token file's path into
        `huggingface_hub.constants` once, at import, and tests/conftest.py sets HF_HUB_OFFLINE=1 for the whole
        suite, so the constants themselves are patched; the environment is set too, for subprocesses and for code
        that reads it (finetune/offline.py reads HF_ENDPOINT). with_token: HF_TOKEN is this hub's token, so a bare
        `HfApi()` authenticates; False: no token anywhere (a stored `hf auth login` token is never read either).
        block_other_hosts: any TCP connection to a host other than this machine fails at once (listed in
        `self.blocked`), so a request meant for huggingface.co can't leave the machine.
        """
        from huggingface_hub import constants
        from huggingface_hub.utils import _http

        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
        # A path that never exists: the developer's own saved token must not be picked up (nor sent, even here).
        no_token = str(Path(tempfile.gettempdir()) / f"fake-hub-{id(self)}-absent" / "token")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", no_token)
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", no_token + "s")
        monkeypatch.setenv("HF_ENDPOINT", self.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_TOKEN_PATH", no_token)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        if with_token:
            monkeypatch.setenv("HF_TOKEN", self.token)
        # A proxy from the environment must not see requests to 127.0.0.1; the shared HTTP client reads proxy
        # settings when it is built, so it is dropped and rebuilt on the next request.
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        _http.close_session()
        if block_other_hosts:
            self._block_other_hosts(monkeypatch)

    def _block_other_hosts(self, monkeypatch) -> None:
        # Python-level sockets only (httpx2, requests, urllib); hf_xet's own transfers never start, as every
        # file is "regular".
        real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
        hub = self

        def refuse(host, port):
            hub.blocked.append((host, port))
            raise OSError(f"FakeHub: connection to {host}:{port} blocked; only {hub.endpoint} may be reached")

        def getaddrinfo(host, port, *args, **kwargs):
            name = host.decode() if isinstance(host, bytes) else host
            if name is not None and name not in LOOPBACK_HOSTS:
                refuse(name, port)
            return real_getaddrinfo(host, port, *args, **kwargs)

        def connect(sock, address):
            if isinstance(address, tuple) and address[0] not in LOOPBACK_HOSTS:
                refuse(address[0], address[1])
            return real_connect(sock, address)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", connect)

    # ------------------------------------------------------------------ state helpers (called under self.lock)

    def _new_oid(self, *parts: str) -> str:
        return hashlib.sha1("\0".join([str(next(self._counter)), *parts]).encode()).hexdigest()

    def _repo_url(self, repo_id: str, repo_type: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.endpoint}/{prefix}{repo_id}"

    def _authorized(self, headers: Headers) -> bool:
        """True for this hub's token, False for no token; a wrong token is a 401 at once."""
        auth = headers.get("Authorization")
        if auth is None:
            return False
        if auth != f"Bearer {self.token}":
            # The real Hub's wording; the client keys its "invalid token" handling on it.
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _require_token(self, headers: Headers) -> None:
        if not self._authorized(headers):
            raise HubError(401, "FakeHub: this endpoint needs a token (Authorization: Bearer <token>); none was sent")

    def _repo(self, repo_type: str, repo_id: str, headers: Headers) -> dict[str, Any]:
        repo = self.repos.get(repo_id)
        signed_in = self._authorized(headers)
        # As on the Hub, a private repo without a token looks missing (401, RepoNotFound).
        if repo is not None and repo["private"] and not signed_in:
            raise HubError(401, "Repository not found", "RepoNotFound")
        if repo is None or repo["type"] != repo_type:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: dict[str, Any], revision: str) -> tuple[str, dict[str, bytes]]:
        """(commit oid, files) of a branch name or a commit oid of this repo."""
        if revision in repo["branches"]:
            return repo["heads"][revision], repo["branches"][revision]
        matches = [oid for oid in repo["oids"] if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return matches[0], self._snapshots[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _branch(self, repo: dict[str, Any], revision: str) -> str:
        # Commits and uploads go to a branch; a commit oid or an unknown name is refused as the Hub does.
        if revision not in repo["branches"]:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return revision

    # ------------------------------------------------------------------ endpoints

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Headers, body: bytes):
        """(status, JSON-able answer, extra headers) for one request; raises HubError for an error answer."""
        if method == "GET" and path == "/api/whoami-v2":
            self._require_token(headers)
            return 200, self._whoami(), {}
        if method == "POST" and path == "/api/repos/create":
            self._require_token(headers)
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            # Metadata is not checked: whatever the card says is accepted, without warnings.
            return 200, {"errors": [], "warnings": []}, {}

        match = REPO_API.match(path)
        if match is None:
            return None
        repo_type = REPO_TYPES[match.group(1)]
        repo_id = match.group(2)
        # The client quotes a revision or a path with safe="" so each is one segment ("a/b" arrives as "a%2Fb").
        rest = [unquote(part) for part in (match.group(3) or "").split("/")[1:]]
        action = rest[0] if rest else ""

        if method == "GET" and action == "" and not rest[1:]:
            return 200, self._repo_info(repo_type, repo_id, "main", headers), {}
        if method == "GET" and action == "revision" and len(rest) == 2:
            return 200, self._repo_info(repo_type, repo_id, rest[1], headers), {}
        if method == "GET" and action == "refs" and len(rest) == 1:
            return 200, self._refs(repo_type, repo_id, headers), {}
        if method == "GET" and action == "tree" and len(rest) in (2, 3):
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            folder = rest[2].strip("/") if len(rest) == 3 else ""
            return 200, self._tree(repo_type, repo_id, rest[1], folder, recursive, headers), {}
        if method == "POST" and action == "paths-info" and len(rest) == 2:
            paths = parse_qs(body.decode()).get("paths", [])
            return 200, self._paths_info(repo_type, repo_id, rest[1], paths, headers), {}
        if method == "POST" and action == "branch" and len(rest) == 2:
            self._require_token(headers)
            return self._create_branch(repo_type, repo_id, rest[1], json.loads(body or b"{}"), headers)
        if method == "POST" and action == "preupload" and len(rest) == 2:
            self._require_token(headers)
            return 200, self._preupload(repo_type, repo_id, rest[1], query, json.loads(body), headers), {}
        if method == "POST" and action == "commit" and len(rest) == 2:
            self._require_token(headers)
            return 200, self._commit(repo_type, repo_id, rest[1], query, body, headers), {}
        return None

    def _whoami(self) -> dict[str, Any]:
        return {
            "type": "user",
            "id": "0" * 24,
            "name": self.user,
            "fullname": self.user,
            "email": None,
            "emailVerified": False,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": "write"}},
        }

    def _create_repo(self, payload: dict[str, Any]):
        # `organization` is None for a bare name: the Hub puts the repo under the token's user.
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        url = self._repo_url(repo_id, repo_type)
        if repo_id in self.repos:
            # create_repo(exist_ok=True) turns this 409 into success; the existing repo keeps its visibility.
            return 409, {"error": f"You already created this {repo_type} repo", "url": url}, {}
        oid = self._new_oid(repo_id, "initial")
        self._snapshots[oid] = {}
        self.repos[repo_id] = {
            "private": payload.get("visibility") == "private",
            "type": repo_type,
            "branches": {"main": {}},
            "heads": {"main": oid},
            "oids": [oid],
        }
        return 200, {"url": url, "name": repo_id, "id": oid[:24]}, {}

    def _repo_info(self, repo_type: str, repo_id: str, revision: str, headers: Headers) -> dict[str, Any]:
        repo = self._repo(repo_type, repo_id, headers)
        oid, files = self._resolve(repo, revision)
        return {
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": oid,
            "private": repo["private"],
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }

    def _refs(self, repo_type: str, repo_id: str, headers: Headers) -> dict[str, Any]:
        repo = self._repo(repo_type, repo_id, headers)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": repo["heads"][name]}
            for name in repo["branches"]
        ]
        return {"branches": branches, "converts": [], "tags": []}

    def _entries(self, files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
        """Every file and folder of a snapshot, by path, in the tree endpoint's format."""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in files.items():
            entries[path] = {"type": "file", "path": path, "oid": git_blob_oid(data), "size": len(data)}
            parts = path.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                oid = hashlib.sha1(folder.encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": oid, "size": 0})
        return entries

    def _tree(self, repo_type, repo_id, revision, folder, recursive, headers) -> list[dict[str, Any]]:
        _, files = self._resolve(self._repo(repo_type, repo_id, headers), revision)
        entries = self._entries(files)
        if folder and entries.get(folder, {}).get("type") != "directory":
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound")
        prefix = f"{folder}/" if folder else ""
        inside = [e for path, e in sorted(entries.items()) if path.startswith(prefix)]
        if not recursive:
            inside = [e for e in inside if "/" not in e["path"][len(prefix) :]]
        return inside

    def _paths_info(self, repo_type, repo_id, revision, paths, headers) -> list[dict[str, Any]]:
        _, files = self._resolve(self._repo(repo_type, repo_id, headers), revision)
        entries = self._entries(files)
        return [entries[p.strip("/")] for p in paths if p.strip("/") in entries]

    def _create_branch(self, repo_type, repo_id, branch, payload, headers):
        repo = self._repo(repo_type, repo_id, headers)
        if branch in repo["branches"]:
            return 409, {"error": "Reference already exists"}, {}
        oid, files = self._resolve(repo, payload.get("startingPoint") or "main")
        repo["branches"][branch] = dict(files)
        repo["heads"][branch] = oid
        return 200, {}, {}

    def _preupload(self, repo_type, repo_id, revision, query, payload, headers) -> dict[str, Any]:
        repo = self._repo(repo_type, repo_id, headers)
        # With create_pr the revision is the PR's base, as on the Hub; otherwise it must be an existing branch.
        files = repo["branches"][self._branch(repo, revision)]
        answer = []
        for f in payload["files"]:
            current = files.get(f["path"])
            answer.append(
                {
                    "path": f["path"],
                    # "regular": the client inlines the file in the commit, no LFS/Xet upload at all.
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    # The oid of the file already there lets the client drop an unchanged file from the commit.
                    "oid": git_blob_oid(current) if current is not None else None,
                }
            )
        return {"files": answer, "commitOid": repo["heads"][revision]}

    def _commit(self, repo_type, repo_id, revision, query, body, headers) -> dict[str, Any]:
        repo = self._repo(repo_type, repo_id, headers)
        if query.get("create_pr"):
            raise HubError(400, "FakeHub does not implement pull requests (create_pr)")
        branch = self._branch(repo, revision)
        header: dict[str, Any] = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        files = dict(repo["branches"][branch])
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = value["content"]
                data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                added[value["path"]] = files[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                path = value["path"].rstrip("/")
                gone = [p for p in files if p == path or (key == "deletedFolder" and p.startswith(path + "/"))]
                if not gone:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
                deleted.append(path)
            else:
                # lfsFile (or anything newer): the preupload answer never asks for it, so the client misbehaved.
                raise HubError(400, f"FakeHub accepts only inline ('regular') files; got a {key!r} line")
        parent = header.get("parentCommit")
        if parent and not repo["heads"][branch].startswith(parent):
            raise HubError(412, f"A commit has happened since {parent}; the branch is at {repo['heads'][branch]}")
        oid = self._new_oid(repo_id, branch, header.get("summary", ""))
        repo["branches"][branch] = files
        repo["heads"][branch] = oid
        repo["oids"].append(oid)
        self._snapshots[oid] = files
        self.commits.append(
            {
                "repo_id": repo_id,
                "revision": branch,
                "message": header.get("summary", ""),
                "description": header.get("description", ""),
                "files": added,
                "deleted": deleted,
                "oid": oid,
            }
        )
        url = f"{self._repo_url(repo_id, repo_type)}/commit/{oid}"
        return {"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on a per-server subclass

    # HTTP/1.0: one request per connection, so no keep-alive bookkeeping and shutdown never waits on an idle socket.
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):
        pass  # hub.requests is the log; stderr stays quiet

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self, status: int, payload: Any, extra: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            # Header values are latin-1 on the wire: a non-ASCII path in a message is escaped, never a crash.
            self.send_header(name, value.encode("ascii", "backslashreplace").decode().replace("\n", " "))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        hub = self.hub
        body = self._read_body()
        headers = Headers(self.headers.items())
        split = urlsplit(self.path)
        with hub.lock:
            hub.requests.append(Request(self.command, self.path, headers, body))
            try:
                result = hub.handle(self.command, split.path, parse_qs(split.query), headers, body)
                if result is None:
                    hub.unhandled.append((self.command, self.path))
                    message = f"FakeHub has no handler for {self.command} {split.path}"
                    result = (404, {"error": message}, {"X-Error-Message": message})
            except HubError as e:
                extra = {"X-Error-Message": e.message}
                if e.code:
                    extra["X-Error-Code"] = e.code
                result = (e.status, {"error": e.message}, extra)
            except Exception as e:
                # A bug here, or a request this stand-in can't parse. 400, not 500: the client retries a 5xx
                # with backoff for half a minute before it says anything.
                hub.errors.append((self.command, self.path, traceback.format_exc()))
                message = f"FakeHub failed on {self.command} {split.path}: {e!r}"
                result = (400, {"error": message}, {"X-Error-Message": message})
        self._answer(*result)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch
