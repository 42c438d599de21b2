"""Prints one of the project's requirement lists from pyproject.toml, one requirement a line, for
the container builds (Dockerfile) and the wheelhouse (scripts/wheelhouse):

    python3 scripts/requirements.py serving   # [project].dependencies without onnxruntime
    python3 scripts/requirements.py train     # the `train` extra without torch and torchvision

Each image installs the packages left out itself, pinned: the CPU or the GPU build of
onnxruntime, and torch and torchvision at the versions the test suite runs with. Standard library
only: it runs in the base image before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# the packages each image installs itself, at a pinned version or a particular build
PINNED_BY_THE_IMAGE = {"onnxruntime", "onnxruntime-gpu", "torch", "torchvision"}


def requirement_name(line: str) -> str:
    return re.split(r"[^A-Za-z0-9._-]", line.strip(), maxsplit=1)[0].lower()


def requirements(which: str, pyproject: Path = PYPROJECT) -> list[str]:
    with pyproject.open("rb") as f:
        project = tomllib.load(f)["project"]
    listed = project["dependencies"] if which == "serving" else project["optional-dependencies"][which]
    return [line for line in listed if requirement_name(line) not in PINNED_BY_THE_IMAGE]


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("serving", "train"):
        sys.exit("usage: python3 scripts/requirements.py serving|train")
    print("\n".join(requirements(sys.argv[1])))
