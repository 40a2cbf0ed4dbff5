"""An upstream far cheaper than fusillade: nginx (Debian's package) answering every request with one fixed chat
completion, started in a scratch directory for the length of a benchmark and stopped after.

One worker process, no access log, keep-alive connections that never close on a request count: what it costs per
request is a few microseconds of C, so a benchmark against it measures the client (the daemon, the bare loop),
not the upstream. The Python mock upstream (`fusillade.mock_upstream`) stays for latency shapes and faults.

    with nginx_upstream() as url:   # "http://127.0.0.1:<port>"
        ...

Needs `/usr/sbin/nginx` (`apt-get install nginx`) or `$FUSILLADE_BENCH_NGINX`; the package's own service is
not used (nor needed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from queue_throughput import RESPONSE

NGINX_VARIABLE = "FUSILLADE_BENCH_NGINX"
CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

CONFIG = """
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    client_body_buffer_size 64k;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def nginx_binary() -> str:
    configured = os.environ.get(NGINX_VARIABLE)
    for candidate in ([configured] if configured else []) + [*CANDIDATES, shutil.which("nginx") or ""]:
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError(
        f"nginx was not found ({', '.join(CANDIDATES)}): install Debian's package (`apt-get install nginx`) "
        f"or set ${NGINX_VARIABLE} to its binary."
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def nginx_upstream() -> Iterator[str]:
    binary = nginx_binary()
    with tempfile.TemporaryDirectory(prefix="fusillade-bench-nginx-") as directory:
        port = _free_port()
        config = Path(directory, "nginx.conf")
        config.write_text(CONFIG.format(directory=directory, port=port, body=RESPONSE.replace("'", "\\'")))
        process = subprocess.Popen(
            [binary, "-c", str(config), "-p", directory, "-e", f"{directory}/error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_answering(url, process)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


def _wait_until_answering(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            error = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"nginx exited at start ({process.returncode}): {error.strip()}")
        try:
            request = urllib.request.Request(f"{url}/v1/chat/completions", data=b"{}", method="POST")
            with urllib.request.urlopen(request, timeout=1) as response:
                if response.read().decode() == RESPONSE:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not answer at {url} within 10 s.")
        time.sleep(0.05)
