# syntax=docker/dockerfile:1
# fusillade in a container. By default `fusillade serve` (the HTTP API and a daemon in one process) on port 8080,
# with its SQLite database in the /data volume. The same image runs `fusillade api`, `fusillade daemon`,
# `fusillade migrate` or `fusillade mock-upstream` when given that command (deploy/compose.yaml does).
#
#   docker build -t fusillade .
#   docker run -p 8080:8080 -v fusillade-data:/data \
#     -e FUSILLADE_AUTH__ADMIN_KEY_ENV=FUSILLADE_ADMIN_KEY -e FUSILLADE_ADMIN_KEY=... fusillade
#
# A public address needs an API key, or the server refuses to start: docs/deploy.md says how to give one.

ARG PYTHON_VERSION=3.12

# ---- builder: the wheel, from the sources, and nothing else ------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# pip fetches the build backend (hatchling) into an isolated environment; --no-deps: only our own wheel.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---- the image: the wheel installed with its dependencies, run as a user without privileges ----------------
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FUSILLADE_DATABASE_URL=sqlite:////data/fusillade.db

RUN groupadd --system --gid 10001 fusillade \
    && useradd --system --uid 10001 --gid fusillade --home-dir /data --no-create-home fusillade \
    && mkdir /data \
    && chown fusillade:fusillade /data

# The wheel comes from the builder through a bind mount, so no layer of this image keeps a copy of it.
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    pip install --no-cache-dir /dist/fusillade-*.whl

# Numeric, so that a runtime can check it is not root (Kubernetes: runAsNonRoot).
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

# Slim images have no curl: Python's urllib asks /healthz (the process answers). An error status, a refused
# connection or a timeout exits non-zero. The port follows FUSILLADE_SERVER__PORT when it is set.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('FUSILLADE_SERVER__PORT', '8080') + '/healthz', timeout=4)"]

CMD ["fusillade", "serve", "--host", "0.0.0.0"]
