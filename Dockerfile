# One image for both roles: the API (default command) and the GPU worker
# (`python -m worker`). torch from PyPI is the CUDA build on Linux x86_64.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

WORKDIR /app

# A C compiler: on a GPU, torch.compile's Triton builds its launcher with one at run time
# ("Failed to find C compiler" in a slim image, and the worker's warm-up fails). Unpinned:
# Debian's security updates replace exact versions, and a pin would then fail the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch alone first: the largest layer, rebuilt only when its pin changes.
RUN pip install --no-cache-dir torch==2.13.0

COPY pyproject.toml README.md ./
COPY bailan ./bailan
COPY app ./app
COPY worker ./worker
# Installed in place (editable): what runs is the code copied here. Its bytecode is compiled
# here, as pip compiles the dependencies': the code is read-only at run time and
# PYTHONDONTWRITEBYTECODE is set, so without it every start compiles it again.
RUN pip install --no-cache-dir -e . \
    && python -m compileall -q bailan app worker

# The worker's default BAILAN_MODEL, models/bailan-shapes, is relative to WORKDIR.
COPY models ./models

# The code and the model stay root-owned and read-only; /cache (the compile
# cache's volume) and /blobs (images and previews, BAILAN_BLOB_DIR under compose)
# are the service's: a named volume takes this ownership when first created.
RUN useradd --create-home --uid 10001 bailan \
    && mkdir -p /cache /blobs \
    && chown 10001 /cache /blobs
USER 10001

# `python -m app` is uvicorn with the limits `make run` gives it (BAILAN_API_*: header size,
# concurrency, keep-alive, backlog; app/server.py): plain uvicorn would have none of them.
ENV BAILAN_HOST=0.0.0.0 \
    BAILAN_PORT=8000
EXPOSE 8000
CMD ["python", "-m", "app"]
