# Slim images per role: `worker` runs onnxruntime only; `train` adds TensorFlow
# and the packages that ship encoder weights.
FROM python:3.11-slim AS base
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md alembic.ini ./
COPY catalog catalog
COPY worker worker
COPY training training
COPY migrations migrations

FROM base AS worker
RUN pip install ".[worker]"

FROM base AS train
# torch is only needed by `shelver encoders export`; prefer its CPU build.
RUN pip install ".[train,export]"
