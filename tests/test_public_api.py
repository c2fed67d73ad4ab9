"""The public API: every exported name imports from its package root, and the names the README points at exist."""
import importlib
import re
from pathlib import Path

import pytest

PACKAGES = ["coder", "coder.losses", "coder.models", "coder.data", "coder.demo"]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_imports(package):
    module = importlib.import_module(package)
    assert module.__all__, f"{package} exports nothing"
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_the_names_users_call_first():
    from coder import compute_recalls, load_config  # noqa: F401
    from coder.evaluation import compute_recalls as same
    from coder.losses import dcl, diversity, infonce, pgc, triplet, uto  # noqa: F401
    from coder.models import build_model, normalized_adjacency  # noqa: F401

    assert compute_recalls is same
    assert callable(diversity) and not hasattr(diversity, "__path__")  # the function, not a module


def test_readme_code_table_points_at_files_that_exist():
    text = README.read_text()
    section = text.split("## Where the paper is in the code", 1)[1].split("\n## ", 1)[0]
    paths = re.findall(r"`(coder/[\w/]+\.py)`", section)
    assert paths, "the README table names no files"
    root = README.parent
    for path in paths:
        assert (root / path).is_file(), f"README names {path}, which does not exist"
