# syntax=docker/dockerfile:1
# The API image: FastAPI under uvicorn, plus the `aligndiff` command for `db upgrade` and
# `keys create`. Build from the repository root: docker build -f docker/api.Dockerfile .
#
# It installs the project WITHOUT its `ml` extra, so no torch, diffusers or transformers:
# synthesis, training and predict run on the workers (docker/worker.Dockerfile).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aligndiff ./aligndiff
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
# NOTE: a virtual environment, so the runtime stage takes the installed project and its
# dependencies in one COPY and none of the build's leftovers.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    WEB_CONCURRENCY=2
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/aligndiff aligndiff
COPY --from=build /opt/venv /opt/venv
USER aligndiff
WORKDIR /home/aligndiff
EXPOSE 8000
# uvicorn runs WEB_CONCURRENCY worker processes (its own variable), each with its own
# database pool (ALIGNDIFF_DATABASE_POOL_SIZE).
CMD ["uvicorn", "service.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "30"]
