"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests that run the real ``huggingface_hub`` client.

It serves model repos held in memory: ``resolve`` (HEAD/GET with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Size``,
byte ranges), ``api/models/{repo}[/revision/{rev}]``, ``api/models/{repo}/tree/{rev}``, and the write routes
``create_repo``, ``create_commit`` and ``upload_folder`` use (``api/repos/create``, ``api/validate-yaml``,
``preupload``, ``commit``; every file is committed inline as a regular file). Errors carry ``X-Error-Code`` as
the Hub sends them.
Every request is recorded in ``requests`` so that tests can check what the client asked for (or that it asked nothing).

It also serves plain files (``/files/{name}``, added with ``put_file``), such as a release URL's, and injects the
faults of a bad network into the next downloads of a file (``fault``): after the headers (the full
``Content-Length``) and half the body, the server drops the connection (``'drop'``), holds it open sending nothing
(``'stall'``, until the server closes) or resets it (``'reset'``, a TCP RST).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

__all__ = ['HubServer']

_REPO = r'(?P<repo>[\w.-]+/[\w.-]+)'


@dataclass
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    head: Optional[str] = None

    def files(self, revision: str) -> Optional[dict[str, bytes]]:
        sha = self.head if revision == 'main' else revision
        return self.commits.get(sha) if sha else None

    def commit(self, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1((self.head or '').encode())
        for path in sorted(files):
            digest.update(path.encode() + b'\0' + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.head = sha
        return sha


class HubServer:
    """An in-memory Hub on ``endpoint`` (``http://127.0.0.1:PORT``); use as a context manager or call ``close``."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.static: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), _handler(self))
        self._httpd.daemon_threads = True
        self.endpoint = f'http://127.0.0.1:{self._httpd.server_address[1]}'
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- direct access for tests ----

    def put(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Add ``files`` (path -> content) to ``repo_id`` (created if new) in one commit; returns its sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo())
            return repo.commit({**(repo.files('main') or {}), **files})

    def put_file(self, name: str, data: bytes) -> str:
        """Serve ``data`` at ``/files/{name}``; returns its URL."""
        self.static[name] = data
        return f'{self.endpoint}/files/{name}'

    def fault(self, name: str, *modes: str) -> None:
        """The next downloads (GET) of the file ``name`` (a plain file, or a repo file's name) fail with ``modes``,
        one each: ``'drop'``, ``'stall'`` or ``'reset'``."""
        assert set(modes) <= {'drop', 'stall', 'reset'}, modes
        self.faults.setdefault(name, []).extend(modes)

    def files(self, repo_id: str, revision: str = 'main') -> dict[str, bytes]:
        return dict(self.repos[repo_id].files(revision) or {})


def _handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._dispatch('HEAD')

        def do_GET(self) -> None:
            self._dispatch('GET')

        def do_POST(self) -> None:
            self._dispatch('POST')

        # ---- plumbing ----

        def _dispatch(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            server.requests.append((method, path))
            length = int(self.headers.get('Content-Length') or 0)
            body = self.rfile.read(length) if length else b''
            self._fault = None
            for verb, pattern, fn in self.routes:
                m = re.fullmatch(pattern, path)
                if m and (verb == method or (verb == 'GET' and method == 'HEAD')):
                    with server._lock:
                        pending = server.faults.get(path.rsplit('/', 1)[-1])
                        if method == 'GET' and pending:
                            self._fault = pending.pop(0)
                        return fn(self, method, body, **m.groupdict())
            self._error(404, 'NotFound', f'no route for {method} {path}')

        def _send(self, status: int, body: bytes = b'', headers: Optional[dict] = None, method: str = 'GET') -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header('Content-Length', str(len(body)) if 'Content-Length' not in (headers or {}) else
                             headers['Content-Length'])
            self.end_headers()
            if method == 'HEAD':
                return
            if self._fault is None or status >= 300:
                self.wfile.write(body)
                return
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            if self._fault == 'stall':
                server._lock.release()  # other requests go on while this one hangs
                try:
                    server._closing.wait(60)
                finally:
                    server._lock.acquire()
            elif self._fault == 'reset':  # closing with a zero linger time sends an RST
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)

        def _json(self, data, status: int = 200, method: str = 'GET') -> None:
            self._send(status, json.dumps(data).encode(), {'Content-Type': 'application/json'}, method)

        def _error(self, status: int, code: str, message: str, headers: Optional[dict] = None) -> None:
            self._send(status, json.dumps({'error': message}).encode(),
                       {'Content-Type': 'application/json', 'X-Error-Code': code, 'X-Error-Message': message,
                        **(headers or {})})

        def _repo(self, repo: str) -> Optional[_Repo]:
            found = server.repos.get(repo)
            if found is None:
                self._error(404, 'RepoNotFound', f'Repository Not Found for url: {self.path}.')
            return found

        def _revision(self, repo: str, revision: str):
            """(repo, its files at ``revision``), or (repo or None, None) after answering 404."""
            found = self._repo(repo)
            if found is None:
                return None, None
            files = found.files(revision)
            if files is None:
                self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
            return found, files

        # ---- routes ----

        def resolve(self, method: str, body: bytes, repo: str, revision: str, filename: str) -> None:
            found, files = self._revision(repo, revision)
            if files is None:
                return
            sha = found.head if revision == 'main' else revision
            if filename not in files:
                return self._error(404, 'EntryNotFound', f'{filename} does not exist at {revision}',
                                   {'X-Repo-Commit': sha})
            data = files[filename]
            etag = hashlib.sha256(data).hexdigest()
            headers = {'X-Repo-Commit': sha, 'ETag': f'"{etag}"', 'X-Linked-Etag': f'"{etag}"',
                       'X-Linked-Size': str(len(data)), 'Accept-Ranges': 'bytes',
                       'Content-Type': 'application/octet-stream'}
            start = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
            if start and method == 'GET':
                offset = int(start.group(1))
                headers['Content-Range'] = f'bytes {offset}-{len(data) - 1}/{len(data)}'
                return self._send(206, data[offset:], headers, method)
            self._send(200, data, headers, method)

        def static(self, method: str, body: bytes, name: str) -> None:
            if name not in server.static:
                return self._error(404, 'NotFound', f'no file {name}')
            self._send(200, server.static[name], {'Content-Type': 'application/octet-stream'}, method)

        def model_info(self, method: str, body: bytes, repo: str, revision: str = 'main') -> None:
            found, files = self._revision(repo, revision)
            if files is None:
                return
            self._json({'id': repo, 'modelId': repo, 'sha': found.head if revision == 'main' else revision,
                        'private': False, 'siblings': [{'rfilename': p} for p in sorted(files)]}, method=method)

        def tree(self, method: str, body: bytes, repo: str, revision: str) -> None:
            _, files = self._revision(repo, revision)
            if files is None:
                return
            self._json([{'type': 'file', 'path': p, 'size': len(d), 'oid': _git_blob_id(d)}
                        for p, d in sorted(files.items())], method=method)

        def create_repo(self, method: str, body: bytes) -> None:
            payload = json.loads(body or b'{}')
            repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
            if repo in server.repos:  # the Hub's 409 also names the existing repo
                return self._send(409, json.dumps({'error': 'You already created this model repo',
                                                   'url': f'{server.endpoint}/{repo}'}).encode(),
                                  {'Content-Type': 'application/json', 'X-Error-Message': 'RepoExists'})
            server.repos[repo] = _Repo()
            server.repos[repo].commit({'.gitattributes': b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'})
            self._json({'url': f'{server.endpoint}/{repo}', 'name': repo, 'id': repo})

        def validate_yaml(self, method: str, body: bytes) -> None:
            self._json({'errors': [], 'warnings': []})

        def preupload(self, method: str, body: bytes, repo: str, revision: str) -> None:
            if self._repo(repo) is None:
                return
            files = json.loads(body)['files']
            self._json({'files': [{'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False, 'oid': None}
                                  for f in files]})

        def commit(self, method: str, body: bytes, repo: str, revision: str) -> None:
            found = self._repo(repo)
            if found is None:
                return
            files = dict(found.files(revision) or {})
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item['key'] == 'file':
                    files[item['value']['path']] = base64.b64decode(item['value']['content'])
                elif item['key'] in ('deletedFile', 'deletedFolder'):
                    prefix = item['value']['path'].rstrip('/')
                    files = {p: d for p, d in files.items() if p != prefix and not p.startswith(prefix + '/')}
                elif item['key'] != 'header':
                    return self._error(400, 'BadRequest', f"this test Hub cannot commit {item['key']!r} entries")
            sha = found.commit(files)
            self._json({'commitUrl': f'{server.endpoint}/{repo}/commit/{sha}', 'commitOid': sha,
                        'success': True, 'pullRequestUrl': None})

        routes = [
            ('GET', rf'/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)', resolve),
            ('GET', r'/files/(?P<name>[^/]+)', static),
            ('GET', rf'/api/models/{_REPO}', model_info),
            ('GET', rf'/api/models/{_REPO}/revision/(?P<revision>[^/]+)', model_info),
            ('GET', rf'/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/.*)?', tree),
            ('POST', r'/api/repos/create', create_repo),
            ('POST', r'/api/validate-yaml', validate_yaml),
            ('POST', rf'/api/models/{_REPO}/preupload/(?P<revision>[^/]+)', preupload),
            ('POST', rf'/api/models/{_REPO}/commit/(?P<revision>[^/]+)', commit),
        ]

    return Handler


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
