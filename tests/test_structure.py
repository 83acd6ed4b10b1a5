"""The files read top to bottom: each imports only files before it, never from inside a function."""
import ast

import pytest

from helpers import ROOT

ORDER = ["rewards", "data", "model", "run", "evaluate", "train_sft", "train_grpo", "bench"]


@pytest.mark.parametrize("position, name", list(enumerate(ORDER)))
def test_each_file_imports_only_the_files_before_it(position, name):
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for module in (m.split(".")[0] for m in modules if m):
                if module in ORDER:
                    assert ORDER.index(module) < position, f"{name}.py imports {module}"
                    assert node.col_offset == 0, f"{name}.py imports {module} inside a function"
