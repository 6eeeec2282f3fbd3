# Slim images per role: `worker` runs onnxruntime only; `web` adds the web application;
# `train` adds TensorFlow
# and the packages that ship encoder weights.
FROM python:3.11-slim AS base
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md alembic.ini ./
COPY catalog catalog
COPY worker worker
COPY training training
COPY migrations migrations
COPY web web

FROM base AS worker
RUN pip install ".[worker]"

# The web application reads images with the worker's checks, so it has the worker extra too.
FROM base AS web
RUN pip install ".[worker,web]"

FROM base AS train
# torch is only needed by `shelver encoders export`; prefer its CPU build.
RUN pip install ".[train,export]"
