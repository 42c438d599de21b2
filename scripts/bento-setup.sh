#!/usr/bin/env bash
# Run by `bentoml containerize` as root while it builds the Bento's image (bentofile.yaml,
# docker.setup_script): the state directory /data, owned by the user the image runs as
# (`bentoml`), so that a new named volume mounted there starts out writable.
set -euo pipefail
install -d -o bentoml -g bentoml -m 0755 /data
