"""The files read top to bottom: each imports only files before it, by name, never from inside a
function; and the seven method files stay small enough to read in a sitting."""
import ast
import io
import tokenize

import pytest

from helpers import ROOT

ORDER = ["rewards", "data", "model", "run", "evaluate", "train_sft", "train_grpo", "bench"]
METHOD_FILES = ORDER[:-1]  # bench.py measures the method; it is not part of it


@pytest.mark.parametrize("position, name", list(enumerate(ORDER)))
def test_each_file_imports_only_the_files_before_it_by_name(position, name):
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for module in (m.split(".")[0] for m in modules if m):
                if module in ORDER:
                    assert ORDER.index(module) < position, f"{name}.py imports {module}"
                    assert node.col_offset == 0, f"{name}.py imports {module} inside a function"
                    assert isinstance(node, ast.ImportFrom), f"{name}.py: import {module} (not by name)"


def code_lines(path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                ast.get_docstring(node, clean=False) is not None:
            docstrings.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    skipped = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
               tokenize.ENDMARKER)
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skipped:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def test_the_method_files_stay_within_their_budget():
    counts = {name: code_lines(ROOT / f"{name}.py") for name in METHOD_FILES}
    assert sum(counts.values()) <= 2200, counts
    assert len((ROOT / "model.py").read_text().splitlines()) <= 700


def test_code_lines_count_code_only(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Doc\nstring."""\n\n# comment\nx = 1  # code\n\n\ndef f():\n    """Doc."""\n'
                      '    return [1,\n            2]\n')
    assert code_lines(sample) == 4  # x = 1, def f, and the two lines of the return
