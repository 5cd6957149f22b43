"""The package builds on a machine that has only its build tools: pyproject's version is read without importing
the package (setuptools falls back to importing it when the attribute is not a literal in the named module, and the
import needs torch and timm, which a fresh build environment lacks)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import timm_stitch

tomllib = pytest.importorskip('tomllib', reason='Python 3.11+ reads TOML')

ROOT = Path(__file__).resolve().parents[1]


def test_version_attr_is_a_literal_in_its_module():
    attr = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']['dynamic']['version']['attr']
    module, _, name = attr.rpartition('.')
    tree = ast.parse((ROOT / Path(*module.split('.'))).with_suffix('.py').read_text())
    literals = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant) for t in node.targets if isinstance(t, ast.Name)}
    assert literals.get(name) == timm_stitch.__version__
