# Container images of transfer-serve: the service on port 3000, its state in the /data volume.
#
#   docker build --target gpu -t transfer-serve:gpu .   # NVIDIA GPU (CUDA 13, cuDNN 9), or CPU
#   docker build --target cpu -t transfer-serve:cpu .   # CPU only: no CUDA library in the image
#
# Both install the dependencies listed in pyproject.toml (the one list), with torch, torchvision
# and onnxruntime pinned to the versions the test suite runs with (override with --build-arg).
# They differ in the base image, the torch wheel index and the onnxruntime package.
# Run, volumes, upgrades, backups, Kubernetes: README.md, "Deployment".

# CUDA 13 needs an NVIDIA driver >= 580 on the host. torch's CUDA 13 wheels bring their own CUDA
# and cuDNN libraries; onnxruntime-gpu loads those (onnxruntime.preload_dlls(), called by
# service/providers.py), and finds the base image's copies on the library path otherwise.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG ONNXRUNTIME_VERSION=1.31.1

# ---- the project's dependencies, read from pyproject.toml, minus the packages each target
# installs itself (torch and torchvision from the right index, the right onnxruntime build)
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; own = {'torch', 'torchvision', 'onnxruntime', 'onnxruntime-gpu'}; print('\n'.join(d for d in deps if re.split(r'[^A-Za-z0-9._-]', d, maxsplit=1)[0].lower() not in own))" > requirements.txt

# ---- GPU: Ubuntu 24.04 with the CUDA 13 runtime and cuDNN 9; its Python is 3.12
FROM ${CUDA_IMAGE} AS gpu-system
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --no-log-init --shell /usr/sbin/nologin app

FROM gpu-system AS gpu-venv
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG ONNXRUNTIME_VERSION
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
# torch from PyPI is the CUDA 13 build and pulls in the nvidia-* library wheels
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        "onnxruntime-gpu==${ONNXRUNTIME_VERSION}" -r /tmp/requirements.txt \
    && /opt/venv/bin/python -c "import sys, onnxruntime as ort; sys.exit(0 if 'CUDAExecutionProvider' in ort.get_available_providers() else 'this onnxruntime has no CUDA provider')"

FROM gpu-system AS gpu
COPY --from=gpu-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BENTOML_DO_NOT_TRACK=True \
    TRANSFER_SERVE_HOME=/data
WORKDIR /app
COPY models/ models/
COPY store/ store/
COPY service/ service/
COPY training/ training/
COPY scripts/entrypoint.sh scripts/
# bytecode compiled now, since the app user cannot write it next to the (root-owned) sources;
# /data created before VOLUME so that a new named volume starts owned by the app user
RUN python -m compileall -q models store service training \
    && mkdir /data && chown 10001:10001 /data
USER 10001:10001
VOLUME /data
EXPOSE 3000
# ready = a model version is loaded and warmed up; the first start on an empty volume builds the
# pretrained model first (a minute or two), hence the long start period
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '3000'), timeout=4)"]
# tini as PID 1: forwards SIGTERM to BentoML and reaps finished retrain-job processes
ENTRYPOINT ["tini", "--", "/app/scripts/entrypoint.sh"]

# ---- CPU: Debian slim with Python 3.12; torch from its CPU-only index, onnxruntime (CPU build)
FROM ${PYTHON_IMAGE} AS cpu-system
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --no-log-init --shell /usr/sbin/nologin app

FROM cpu-system AS cpu-venv
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG ONNXRUNTIME_VERSION
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
# torch first, from the CPU index: the second install finds it satisfied and adds no CUDA wheel;
# the last command fails the build if any CUDA package got in anyway
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && /opt/venv/bin/pip install --no-cache-dir \
        "onnxruntime==${ONNXRUNTIME_VERSION}" -r /tmp/requirements.txt \
    && /opt/venv/bin/python -c "import sys, importlib.metadata as md; cuda = sorted(n for n in (d.metadata['Name'].lower() for d in md.distributions()) if n.startswith('nvidia-') or n == 'onnxruntime-gpu'); sys.exit('CUDA packages in the CPU image: %s' % cuda if cuda else 0)"

FROM cpu-system AS cpu
COPY --from=cpu-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BENTOML_DO_NOT_TRACK=True \
    TRANSFER_SERVE_HOME=/data \
    TRANSFER_SERVE_PROVIDERS=cpu
WORKDIR /app
COPY models/ models/
COPY store/ store/
COPY service/ service/
COPY training/ training/
COPY scripts/entrypoint.sh scripts/
RUN python -m compileall -q models store service training \
    && mkdir /data && chown 10001:10001 /data
USER 10001:10001
VOLUME /data
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '3000'), timeout=4)"]
ENTRYPOINT ["tini", "--", "/app/scripts/entrypoint.sh"]
