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


def test_the_top_level_names_each_have_their_floor_in_the_package_docstring():
    """``sdo.__all__`` stays a list a reader can take in: each name sits in one group of the package docstring, so
    a name added without a place (or a place left after its name went) fails here."""
    import re

    import sdo

    doc = sdo.__doc__.split("by floor", 1)[1]
    named = set(re.findall(r"``(\w+)``", doc)) - {"__all__"}
    assert named == set(sdo.__all__), (sorted(set(sdo.__all__) - named), sorted(named - set(sdo.__all__)))
