"""No function in experiments/ or cli/ runs past a screen: long ones are split into named phases."""

import ast

from helpers import ROOT, python_files

MAX_LINES = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in python_files("api", "experiments", "cli"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)


def test_the_training_loop_fits_on_one_screen():
    tree = ast.parse((ROOT / "experiments" / "runner.py").read_text(encoding="utf-8"))
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_loop")
    assert loop.end_lineno - loop.lineno + 1 <= 40
