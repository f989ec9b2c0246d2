"""A stand-in for the Hugging Face Hub, serving one model directory as one repository at one commit.

The real Hub cannot be reached from this machine. This serves the routes that `huggingface_hub`'s
`snapshot_download` uses for a pinned commit, with the headers it reads, so that the model_cache
role's hub path (endpoint, token, allow patterns, background download, progress polling, manifest)
runs with the real client library on the node:

    GET  /api/models/<repo>/revision/<short commit>                 the full commit (repo info)
    GET  /api/models/<repo>/tree/<commit>[/<path>]?recursive=true   the file listing
    HEAD|GET /<repo>/resolve/<commit>/<path>                        one file, with X-Repo-Commit and ETag

Requests must carry `Authorization: Bearer <token>` when a token is set (a gated repository).
Every request path is recorded in `requests`, so a test can see what the client fetched.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path


class HubStandIn:
    def __init__(self, root: Path, repo_id: str, commit: str, token: str = "", host: str = "0.0.0.0") -> None:
        self.root, self.repo_id, self.commit, self.token = root, repo_id, commit, token
        self.files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        self.requests: list[str] = []
        self.server = http.server.ThreadingHTTPServer((host, 0), self._handler())
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _entry(self, path: str) -> dict:
        data = (self.root / path).read_bytes()
        # Git's blob id, as the Hub reports it (oid); the ETag of a non-LFS file.
        oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return {"type": "file", "oid": oid, "size": len(data), "path": path}

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status: int, message: str, head: bool = False) -> None:
                body = json.dumps({"error": message}).encode()
                headers = {"Content-Type": "application/json", "X-Error-Message": message}
                self._send(status, body, headers, head)

            def _route(self, head: bool) -> None:
                url = urllib.parse.urlsplit(self.path)
                path = urllib.parse.unquote(url.path)
                hub.requests.append(f"{self.command} {path}")
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._error(401, "Invalid credentials in Authorization header", head)
                info = f"/api/models/{hub.repo_id}/revision/"
                short = path[len(info) :] if path.startswith(info) else ""
                if short and hub.commit.startswith(short):
                    # A short commit resolves to the full one, as on the Hub.
                    siblings = [{"rfilename": f} for f in hub.files]
                    body = json.dumps({"id": hub.repo_id, "sha": hub.commit, "siblings": siblings}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                tree = f"/api/models/{hub.repo_id}/tree/{hub.commit}"
                resolve = f"/{hub.repo_id}/resolve/{hub.commit}/"
                if path == tree or path.startswith(tree + "/"):
                    prefix = path[len(tree) + 1 :]
                    listing = [hub._entry(f) for f in hub.files if f.startswith(prefix)]
                    body = json.dumps(listing).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                if path.startswith(resolve) and path[len(resolve) :] in hub.files:
                    name = path[len(resolve) :]
                    data = (hub.root / name).read_bytes()
                    headers = {
                        "X-Repo-Commit": hub.commit,
                        "ETag": f'"{hub._entry(name)["oid"]}"',
                        "Content-Type": "application/octet-stream",
                    }
                    return self._send(200, data, headers, head)
                if not path.startswith((f"/api/models/{hub.repo_id}/", f"/{hub.repo_id}/")):
                    return self._error(404, "Repository not found", head)
                if hub.commit not in path:
                    return self._error(404, "Revision Not Found", head)
                return self._error(404, "Entry not found", head)

            def do_GET(self) -> None:
                self._route(head=False)

            def do_HEAD(self) -> None:
                self._route(head=True)

        return Handler
