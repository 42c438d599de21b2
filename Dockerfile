# Container images of transfer-serve (BuildKit: Docker 23+, or DOCKER_BUILDKIT=1 on older engines).
#
#   docker build --target cpu -t transfer-serve:cpu .           # serving on the CPU (onnxruntime)
#   docker build --target gpu -t transfer-serve:gpu .           # serving on an NVIDIA GPU, or on the CPU without one
#   docker build --target trainer -t transfer-serve:trainer .   # the training CLI (torch, timm)
#
# The serving images carry no torch: the request path and the head retraining are torch-free.
# An empty /data volume is seeded with the pretrained ImageNet classifier that the trainer made
# while the image was built (stage `seed`). The trainer is the CPU serving image plus torch,
# torchvision, timm and training/, so every stage that needs torch builds on it.
#
# Where no package index is reachable, `bash scripts/wheelhouse` fills wheelhouse/ on a machine
# with pip; the build then installs from those wheels alone. With no registry either, make the base
# image from Debian packages (`bash scripts/docker-setup` makes transfer-serve-base:bookworm) and pass
# --build-arg PYTHON_IMAGE=transfer-serve-base:bookworm
# (README.md, "Build the images without a registry").

# PYTHON_IMAGE: any Debian or Ubuntu image with python3 (3.11+) and its venv module; the wheelhouse
# must be made for its Python version (scripts/wheelhouse: 3.11, Debian bookworm's).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG ONNXRUNTIME_VERSION=1.31.1
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

# ---- the requirement lists, read from pyproject.toml (scripts/requirements.py), alone in their
# directory: the installs below are rebuilt when a list changes, not when pyproject.toml does
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
COPY scripts/requirements.py scripts/
RUN mkdir /requirements \
    && python3 scripts/requirements.py serving > /requirements/serving.txt \
    && python3 scripts/requirements.py train > /requirements/train.txt

# ---- what every image has: tini as PID 1 (forwards SIGTERM, reaps retrain-job processes), the
# app user, /data created before VOLUME so that a new named volume starts owned by that user, and
# the serving images' way of running (port, health check, entry point; the trainer replaces them)
FROM ${PYTHON_IMAGE} AS system
RUN if ! command -v tini > /dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /data --no-log-init \
        --shell /usr/sbin/nologin app \
    && mkdir /data && chown 10001:10001 /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BENTOML_DO_NOT_TRACK=True \
    TRANSFER_SERVE_HOME=/data
# what `docker image prune --filter label=...` picks this project's superseded images by
LABEL org.opencontainers.image.title=transfer-serve
VOLUME /data
EXPOSE 3000
# ready = a model version is loaded and warmed up
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '3000'), timeout=4)"]
ENTRYPOINT ["tini", "--", "/app/scripts/entrypoint.sh"]

# ---- the code the serving images run, compiled now: the app user cannot write bytecode next to
# the root-owned sources
FROM system AS serving-code
WORKDIR /app
COPY models/ models/
COPY store/ store/
COPY service/ service/
COPY scripts/entrypoint.sh scripts/
RUN python3 -m compileall -q models store service

# ---- the serving environments (the CPU one checked for CUDA libraries and torch; BentoML's
# nvidia-ml-py is a pure-Python binding that loads the driver's library only where there is one).
# The wheelhouse is bind-mounted, never copied into a layer; when it holds wheels, pip installs
# from it alone (air-gapped builds), else from the package index (scripts/pip-install).
FROM system AS cpu-venv
ARG ONNXRUNTIME_VERSION
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    --mount=type=bind,from=requirements,source=/requirements,target=/requirements \
    --mount=type=bind,source=scripts/pip-install,target=/usr/local/bin/pip-install \
    python3 -m venv /opt/venv \
    && pip-install "onnxruntime==${ONNXRUNTIME_VERSION}" -r /requirements/serving.txt \
    && python -c "import sys, importlib.metadata as md; bad = sorted(n for n in (d.metadata['Name'].lower() for d in md.distributions()) if (n.startswith('nvidia-') and n != 'nvidia-ml-py') or n in ('torch', 'torchvision', 'timm', 'onnxruntime-gpu')); sys.exit('not for the CPU serving image: %s' % bad if bad else 0)"

# CUDA 13 and cuDNN 9 come from the nvidia-* wheels: onnxruntime-gpu's [cuda,cudnn] extras, plus
# cuBLAS, which the CUDA provider links against but those extras leave out. So the base image
# needs no CUDA; the NVIDIA container runtime adds the driver's libcuda at run time.
FROM system AS gpu-venv
ARG ONNXRUNTIME_VERSION
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    --mount=type=bind,from=requirements,source=/requirements,target=/requirements \
    --mount=type=bind,source=scripts/pip-install,target=/usr/local/bin/pip-install \
    python3 -m venv /opt/venv \
    && pip-install "onnxruntime-gpu[cuda,cudnn]==${ONNXRUNTIME_VERSION}" "nvidia-cublas>=13,<14" \
        -r /requirements/serving.txt \
    && python -c "import sys, onnxruntime as ort; sys.exit(0 if 'CUDAExecutionProvider' in ort.get_available_providers() else 'this onnxruntime has no CUDA provider')"

# ---- the CPU serving environment: the layers the `cpu` image and the trainer share
FROM system AS cpu-runtime
COPY --from=cpu-venv /opt/venv /opt/venv
ENV TRANSFER_SERVE_PROVIDERS=cpu

# ---- the trainer: `docker run -v transfer-serve-data:/data -v /photos:/images:ro transfer-serve:trainer
# python -m training fit --data /images --activate`. The CPU serving environment plus torch (from
# PyPI: its CUDA build, so it trains on a GPU where the container gets one), torchvision and timm,
# installed before the code so that a change to the code leaves this layer cached.
FROM cpu-runtime AS trainer
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    --mount=type=bind,from=requirements,source=/requirements,target=/requirements \
    --mount=type=bind,source=scripts/pip-install,target=/usr/local/bin/pip-install \
    pip-install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" -r /requirements/train.txt
COPY --from=serving-code /app /app
WORKDIR /app
COPY training/ training/
RUN python -m compileall -q training
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "training", "--help"]

# ---- the serving images' built-in model: the pretrained classifier, exported and checked against
# torch here, so that a serving container never needs torch to start on an empty volume
FROM trainer AS seed
RUN TRANSFER_SERVE_HOME=/tmp/seed python -m training bootstrap \
    && rm -f /tmp/seed/*.db /tmp/seed/*.db-* \
    && test -d /tmp/seed/versions \
    && chmod -R a+rX /tmp/seed

# ---- serving, CPU
FROM cpu-runtime AS cpu
COPY --from=serving-code /app /app
COPY --from=seed /tmp/seed /opt/seed
WORKDIR /app
USER 10001:10001

# ---- serving, GPU (CPU where the driver reports no GPU, and it says so in its log)
FROM system AS gpu
COPY --from=gpu-venv /opt/venv /opt/venv
# the dynamic linker finds the wheels' CUDA libraries like system ones (onnxruntime.preload_dlls()
# loads them too, but a library loaded later by name must resolve without it)
RUN find /opt/venv -path '*/site-packages/nvidia/*/lib' -type d > /etc/ld.so.conf.d/nvidia-wheels.conf \
    && ldconfig
COPY --from=serving-code /app /app
COPY --from=seed /tmp/seed /opt/seed
WORKDIR /app
# without them the NVIDIA container runtime mounts no GPU and not the driver's libcuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
