"""The embedded default source: this Python's standard-library documentation over HTTP.

``python -m tasks.docserver --port 0`` serves the pages that pydoc renders (what
``python -m pydoc -p`` shows) on loopback, prints its base URL as the first line of
standard output and serves until it is killed. It needs no stdin, unlike ``pydoc -p``,
which exits when stdin is not a terminal. ``serve_python_docs()`` runs it as a
subprocess for the length of a ``with`` block, so a crawl has a real website to fetch
without any network access.

pydoc renders each page on demand and *imports* the module it documents. Importing
arbitrary modules is what makes the stock server unsafe to crawl: test suites, GUI
toolkits and ``__main__`` modules run code on import and hung it, and third-party pages
can be tens of MB. So only standard-library modules are served, minus a denylist
(see ``is_allowed_module``); everything else answers 404 without being imported.
Rendering is serialised by a lock because pydoc re-imports modules (deleting them from
``sys.modules`` first) on every page, which is not safe to do from two threads at once.

This module uses only the standard library, so the subprocess can run with ``python -S``
(no site-packages on ``sys.path``, no ``.pth`` import hooks).
"""

from __future__ import annotations

import argparse
import os
import pydoc
import queue
import re
import subprocess
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

ROBOTS_TXT = """\
# Source dumps and search pages are not documentation (and search imports every module).
User-agent: *
Disallow: /getfile
Disallow: /get?key=
Disallow: /search?key=
"""

CSS_PATH = "/pydoc_data/_pydoc.css"
FIXED_PAGES = {"/", "/index.html", "/topics.html", "/keywords.html"}
ERROR_TITLE = "<title>Pydoc: Error - "

# Why each top-level module is refused although it is in the standard library:
DENIED_MODULES = {
    "antigravity",   # opens a web browser on import
    "this",          # prints the Zen of Python on import
    "idlelib",       # the IDLE GUI: imports tkinter, and holds GUI test scaffolding
    "tkinter",       # GUI toolkit: needs a display / Tcl, hung the server
    "turtle",        # imports tkinter
    "turtledemo",    # tkinter demos, run code on import
    "lib2to3",       # deprecated; writes grammar pickle caches beside itself on import
    "ensurepip",     # a pip installer with bundled wheels, nothing to read
    "pydoc_data",    # one 700 kB dict of the topic texts, already served as topic pages
    "distutils",     # deprecated; setuptools' import hook swaps in its own copy
    "site",          # re-running site.main() re-adds site-packages and .pth import hooks
}
# Components containing "test" are test suites (test.*, unittest.test, ctypes.test,
# idlelib.idle_test, lib2to3.tests, ...); these two are the only real modules among them.
TEST_LIKE_ALLOWED = {"doctest", "unittest"}
DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def is_allowed_module(name: str) -> bool:
    """Whether the object ``name`` (``json``, ``json.decoder``, ``os.path.join``) is served.

    Allowed: names under a standard-library top-level module (``sys.stdlib_module_names``).
    Refused: ``DENIED_MODULES``; test suites; private names (a component starting with
    ``_``, which also covers ``__main__`` modules that run programs, and the import
    machinery in ``importlib._bootstrap``; private modules mostly duplicate the public
    module's documentation, e.g. ``_json``, ``_pydecimal``); and the ``xx*`` example
    extension modules. ``__future__`` is the one public dunder module.
    """
    if not DOTTED_NAME.fullmatch(name):
        return False
    parts = name.split(".")
    top = parts[0]
    if top not in sys.stdlib_module_names or top in DENIED_MODULES or top.startswith("xx"):
        return False
    for part in parts:
        if part.startswith("_") and part != "__future__":
            return False
        if "test" in part.lower() and part not in TEST_LIKE_ALLOWED:
            return False
    return True


def _topic_names() -> set[str]:
    return set(pydoc.Helper.topics) | set(pydoc.Helper.keywords)


def content_type_for(path: str) -> str | None:
    """The content type pydoc should render ``path`` as, or None when it is not served.

    Served: the index, topics and keywords pages, the stylesheet, ``/<name>.html`` for an
    allowed object and ``/topic?key=<topic or keyword or allowed object>`` (what the topic
    pages link to). The stylesheet is matched exactly because pydoc joins any ``.css``
    path onto its own directory, which would let ``/../../x.css`` read other files.
    """
    parts = urlsplit(path)
    if parts.query:
        key = parts.query.removeprefix("key=")
        if parts.path != "/topic" or key == parts.query:
            return None
        key = key.removesuffix(".html")
        return "text/html" if key in _topic_names() or is_allowed_module(key) else None
    if path == CSS_PATH:
        return "text/css"
    if path in FIXED_PAGES:
        return "text/html"
    if path.startswith("/") and path.endswith(".html") and is_allowed_module(path[1:-5]):
        return "text/html"
    return None


def stdlib_path(entries: list[str]) -> list[str]:
    """The entries of ``sys.path`` that hold the standard library.

    pydoc's index page lists every module on ``sys.path``; keeping only these makes the
    index (the natural seed) link to standard-library modules rather than to thousands
    of installed packages that would all answer 404.
    """
    roots = {Path(sysconfig.get_path(key)).resolve() for key in ("stdlib", "platstdlib")}
    kept = []
    for entry in entries:
        if not entry:
            continue
        resolved = Path(entry).resolve()
        if {"site-packages", "dist-packages"} & set(resolved.parts):
            continue
        inside = any(resolved == root or root in resolved.parents for root in roots)
        if inside or re.fullmatch(r"python3\d+\.zip", resolved.name):
            kept.append(entry)
    return kept


class DocsHandler(BaseHTTPRequestHandler):
    """Serves allowed pydoc pages and a robots.txt; 404 for everything else."""

    server_version = "forgeline-pydoc/0.1"
    render_lock = threading.Lock()
    docs_path: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        if self.path == "/robots.txt":
            self._send(200, "text/plain", ROBOTS_TXT, send_body)
            return
        content_type = content_type_for(self.path)
        if content_type is None:
            self._send(404, "text/plain", f"not served: {self.path}\n", send_body)
            return
        body = self._render(content_type)
        status = 404 if content_type == "text/html" and ERROR_TITLE in body[:2000] else 200
        self._send(status, content_type, body, send_body)

    def _render(self, content_type: str) -> str:
        # pydoc re-imports the documented module, and a re-import of `site` or of a
        # package's __init__ may change sys.path; restore it so the index stays stdlib-only.
        with self.render_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return pydoc._url_handler(self.path, content_type)
            finally:
                sys.path[:] = self.docs_path

    def _send(self, status: int, content_type: str, text: str, send_body: bool) -> None:
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Quiet: a crawl makes hundreds of requests and the crawler logs what it needs."""


class DocsServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # a crawler opens several connections at once

    def handle_error(self, request, client_address) -> None:
        # A crawler that abandons an over-long page resets the connection: not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def make_server(host: str = "127.0.0.1", port: int = 0) -> DocsServer:
    """A bound, listening docs server (call ``serve_forever`` on it). Meant for the server
    process only: it narrows this process's ``sys.path`` to the standard library."""
    sys.path[:] = stdlib_path(sys.path)
    DocsHandler.docs_path = list(sys.path)
    return DocsServer((host, port), DocsHandler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.docserver",
        description="Serve this Python's standard-library documentation (pydoc) over HTTP; "
                    "prints the base URL as the first line, then serves until killed.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one")
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port)
    host, port = server.server_address[:2]
    try:
        print(f"http://{host}:{port}/", flush=True)
        # Nobody reads our stdout after the first line: a module that prints on import
        # must not fill the pipe and block the server.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@contextmanager
def serve_python_docs(timeout: float = 30.0, host: str = "127.0.0.1") -> Iterator[str]:
    """Run the docs server in a subprocess; yield its base URL, e.g. ``http://127.0.0.1:40123/``.

    The process is always stopped on exit (terminated, then killed after a grace period).
    Raises RuntimeError if it does not print its URL within ``timeout`` seconds.
    """
    package_root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-S", "-m", "tasks.docserver", "--host", host, "--port", "0"]
    process = subprocess.Popen(command, cwd=package_root, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, text=True)
    try:
        yield _read_url(process, timeout)
    finally:
        _stop(process)


def _read_url(process: subprocess.Popen, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        url = lines.get(timeout=timeout).strip()
    except queue.Empty:
        raise RuntimeError(f"the Python docs server printed no URL within {timeout:.0f}s") \
            from None
    if not url.startswith("http://"):
        code = process.poll()
        raise RuntimeError(f"the Python docs server failed to start (exit code {code}, "
                           f"first line {url!r}); see its error output above")
    return url


def _stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()


if __name__ == "__main__":
    main()
