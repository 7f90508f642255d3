"""The house rules that no linter states: modules of a few hundred lines (at most 400), and an explicit ``__all__``
in every module of the package."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sdo"


def test_no_module_is_over_400_lines_and_each_states_its_public_names():
    long, bare = [], []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().count("\n")
        if lines > 400:
            long.append(f"{path.relative_to(SRC)}: {lines}")
        tree = ast.parse(path.read_text())
        names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)}
        if path.name != "__main__.py" and "__all__" not in names and any(
                isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
                for node in tree.body):
            bare.append(str(path.relative_to(SRC)))
    assert not long, f"modules over 400 lines: {long}"
    assert not bare, f"modules with public definitions but no __all__: {bare}"
