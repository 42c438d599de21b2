"""Project level (the source tree, every package), a static audit: nothing in models/, store/,
service/ or training/ deserialises with pickle (or a library built on it) what a client or the
state directory can influence.

Models are ONNX + JSON, arrays are ``.npy`` loaded with ``allow_pickle=False``, embeddings are raw
float32 bytes, torch checkpoints are loaded with ``weights_only=True``. Ruff's bandit rules (run by
``scripts/test``) already refuse pickle, dill, shelve, marshal, ``pandas.read_pickle`` and
``yaml.load`` without a safe loader (S301, S302, S506); this audit covers what they cannot see,
reading the syntax tree (comments and docstrings that mention pickle do not count):
``numpy.load`` without ``allow_pickle=False`` (or ``allow_pickle=True`` anywhere), ``torch.load``
without ``weights_only=True``, joblib and cloudpickle, ``yaml.unsafe_load``/``full_load``, and
BentoML's ``custom_objects`` (a cloudpickle file in the model directory) and ``picklable_model``.

Not covered here, by design: BentoML's own calls between its services, which pickle numpy arrays
over a unix socket in a private (0700) temporary directory; the public server refuses that media
type (tests/service/test_service.py checks it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.paths import ROOT

AUDITED = ("models", "store", "service", "training")
#: libraries that unpickle and that ruff's rules do not know
PICKLING_MODULES = frozenset({"cloudpickle", "joblib"})


def _is_constant(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


class _Audit(ast.NodeVisitor):
    """Collects ``(line, problem)`` for one module; resolves ``import numpy as np`` style aliases."""

    def __init__(self) -> None:
        self.problems: list[tuple[int, str]] = []
        self.aliases: dict[str, str] = {}  # local name -> dotted module or object it stands for

    def _flag(self, node: ast.AST, problem: str) -> None:
        self.problems.append((getattr(node, "lineno", 0), problem))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            root = alias.name.split(".")[0]
            if root in PICKLING_MODULES:
                self._flag(node, f"imports {alias.name}")
            self.aliases[alias.asname or root] = alias.name if alias.asname else root
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in PICKLING_MODULES:
            self._flag(node, f"imports from {module}")
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        self.generic_visit(node)

    def _dotted(self, node: ast.AST) -> str | None:
        """``np.load`` -> ``numpy.load`` (through the aliases), or None for anything else."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        parts.append(self.aliases.get(node.id, node.id))
        return ".".join(reversed(parts))

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func) or ""
        if name in ("numpy.load", "np.load") and not _is_constant(_keyword(node, "allow_pickle"), False):
            self._flag(node, f"{name}(...) without allow_pickle=False")
        if name == "torch.load" and not _is_constant(_keyword(node, "weights_only"), True):
            self._flag(node, "torch.load(...) without weights_only=True")
        if _is_constant(_keyword(node, "allow_pickle"), True):
            self._flag(node, f"{name or 'a call'}(..., allow_pickle=True)")
        if name.endswith("picklable_model") or name.split(".")[0] in PICKLING_MODULES:
            self._flag(node, f"calls {name}")
        if name in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load"):
            self._flag(node, f"calls {name}")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in ("custom_objects", "picklable_model"):
            self._flag(node, f"uses .{node.attr} (BentoML unpickles it with cloudpickle)")
        self.generic_visit(node)


def audit_source(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    audit = _Audit()
    audit.visit(ast.parse(source, filename))
    return audit.problems


def audited_files() -> list[Path]:
    return sorted(p for folder in AUDITED for p in (ROOT / folder).rglob("*.py"))


def test_no_pickle_in_the_source() -> None:
    files = audited_files()
    assert len(files) > 20, "the audit found too few files: wrong root?"
    problems = [f"{path.relative_to(ROOT)}:{line}: {problem}"
                for path in files for line, problem in audit_source(path.read_text(), str(path))]
    assert problems == [], "pickle-based loading found:\n" + "\n".join(problems)


def test_the_places_that_load_arrays_and_checkpoints_are_seen() -> None:
    """The audit is only worth something if it looks where the loading happens: the registry's
    ``.npy`` files and training's checkpoints are visited, and pass."""
    sources = {p.relative_to(ROOT).as_posix(): p.read_text() for p in audited_files()}
    assert "np.load(" in sources["store/registry.py"]
    assert "torch.load(" in sources["training/backbones.py"]
    assert audit_source(sources["store/registry.py"]) == []
    assert audit_source(sources["training/backbones.py"]) == []


BAD = {
    "import cloudpickle as cp": "imports cloudpickle",
    "from joblib import load": "imports from joblib",
    "import numpy as np\nnp.load('x.npy')": "without allow_pickle=False",
    "import numpy\nnumpy.load('x.npy', allow_pickle=True)": "allow_pickle=True",
    "from numpy import load\nload('x.npy')": "without allow_pickle=False",
    "import numpy as np\nflag = False\nnp.load('x.npy', allow_pickle=flag)": "without allow_pickle=False",
    "import torch\ntorch.load('w.pt')": "without weights_only=True",
    "import torch\ntorch.load('w.pt', weights_only=False)": "without weights_only=True",
    "import yaml\nyaml.unsafe_load(open('x'))": "unsafe_load",
    "model = get()\nobjs = model.custom_objects": "custom_objects",
}


@pytest.mark.parametrize("source", BAD)
def test_the_audit_catches(source: str) -> None:
    problems = audit_source(source)
    assert problems and any(BAD[source] in problem for _, problem in problems), problems


GOOD = [
    "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
    "import numpy as np\nnp.save('x.npy', a, allow_pickle=False)",
    "import torch\ntorch.load('w.pt', map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load('a: 1')",
    '"""Loaded without pickle."""\n# never unpickle\nmodel.eval()',
    "import json\njson.load(open('spec.json'))",
]


@pytest.mark.parametrize("source", GOOD)
def test_the_audit_passes_safe_loading(source: str) -> None:
    assert audit_source(source) == []


def test_ruff_refuses_what_this_audit_leaves_to_it(tmp_path: Path) -> None:
    """The division of labour holds only while the project's ruff settings select bandit's rules."""
    import subprocess
    import sys

    source = tmp_path / "unpickles.py"
    source.write_text("import pickle\nimport yaml\n\npickle.loads(b'')\nyaml.load('a: 1')\n")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"),
                             "--no-cache", "--output-format", "concise", str(source)],
                            capture_output=True, text=True, check=False)
    assert "S301" in result.stdout and "S506" in result.stdout, result.stdout + result.stderr
