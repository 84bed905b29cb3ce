"""How the package is laid out, held by tests where ruff and import-linter cannot say it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "competition"


def _logic(tree: ast.Module) -> list[str]:
    """Statements of a module that are neither its docstring, an import nor ``__all__``."""
    out = []
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        out.append(f"line {node.lineno}: {type(node).__name__}")
    return out


def test_package_init_files_only_re_export():
    # The top-level package may also set the two things every import needs first: the version, and
    # albumentations' update check turned off before anything imports it.
    allowed_top = {"__version__", "NO_ALBUMENTATIONS_UPDATE"}
    found = {}
    for init in sorted(PACKAGE.rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        logic = _logic(tree)
        if init.parent == PACKAGE:
            src = init.read_text().splitlines()
            logic = [x for x in logic if not any(a in src[int(x.split()[1].rstrip(":")) - 1] for a in allowed_top)]
        if logic:
            found[str(init.relative_to(PACKAGE.parent))] = logic
    assert not found, f"__init__.py files hold logic (move it into a module and re-export it): {found}"
