# syntax=docker/dockerfile:1
# The worker image: `aligndiff worker` on one NVIDIA GPU, with the CUDA build of torch and the
# project's `ml` extra. Build from the repository root: docker build -f docker/worker.Dockerfile .
#
# Build arguments choose the CUDA build; keep the three consistent, and pick a CUDA version the
# hosts' NVIDIA driver supports (CUDA 13.0 needs driver 580 or newer; for older drivers, e.g.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 with a 12.8 CUDA_IMAGE, when the
# PyTorch release offers that build).

# NOTE: the `base` flavour (driver hooks and the CUDA runtime only) is enough: the torch wheels
# bring their own cuBLAS, cuDNN and NCCL, which the `runtime` flavour would only duplicate.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ${CUDA_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
# CUDA numbers GPUs in nvidia-smi's (PCI bus) order, so an index claim-gpu.sh takes is the GPU
# CUDA opens. The models volume holds the tiny models' cache and, through HF_HOME, whatever a
# hub id (ALIGNDIFF_DIFFUSION_MODEL=org/name) downloads.
ENV CUDA_DEVICE_ORDER=PCI_BUS_ID \
    ALIGNDIFF_DEVICE=cuda \
    ALIGNDIFF_MODEL_CACHE_DIR=/models/aligndiff \
    HF_HOME=/models/huggingface \
    GPU_LOCK_DIR=/var/lib/aligndiff/gpu-locks

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv

# NOTE: torch first, pinned, from the PyTorch index of its CUDA build: the project's own
# requirement (torch>=2.4) is then already met and pip leaves this build in place.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY aligndiff ./aligndiff
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN pip install ".[ml]" \
    && pip check \
    && rm -rf /src

COPY docker/claim-gpu.sh /opt/aligndiff/claim-gpu.sh
COPY docker/worker_healthcheck.py /opt/aligndiff/worker_healthcheck.py

# NOTE: the model cache and the GPU locks are volumes; made here with their owner, a new named
# volume starts as a copy of them and so is writable by the non-root user.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/aligndiff aligndiff \
    && mkdir -p /models/aligndiff /models/huggingface "${GPU_LOCK_DIR}" \
    && chown -R aligndiff:aligndiff /models "${GPU_LOCK_DIR}" \
    && chmod 0755 /opt/aligndiff/claim-gpu.sh
USER aligndiff
WORKDIR /home/aligndiff

ENTRYPOINT ["/opt/aligndiff/claim-gpu.sh"]
CMD ["aligndiff", "worker", "--pool", "solo"]
