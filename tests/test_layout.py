"""Project layout rules that break things when violated."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_script_shadows_a_standard_library_module():
    # `python bench/x.py` puts bench/ first on sys.path: a bench/tokenize.py breaks `import logging`.
    clashes = [p.name for p in (REPO / "bench").glob("*.py") if p.stem in sys.stdlib_module_names]
    assert not clashes, f"rename {clashes}: they shadow standard-library modules for scripts run from bench/"


def test_models_never_import_ray():
    offenders = []
    for path in (REPO / "sidforge" / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not offenders, offenders
