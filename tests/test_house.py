"""The house in layers: concordia_ir <- lowering <- backends <- handlers <- concordia. Every
import, at module level or inside a function, points down (or stays on its floor); the IR
loads nothing above it; no generic top-level name is installed."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLOORS = {"concordia_ir": 1, "lowering": 2, "backends": 3, "handlers": 4, "concordia": 5}
IMPORTED_AS = {"concordia_ir": 1, "concordia.lowering": 2, "concordia.backends": 3,
               "concordia.handlers": 4, "concordia": 5}


def floor_of_import(name: str) -> int | None:
    for prefix in sorted(IMPORTED_AS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return IMPORTED_AS[prefix]
    return None


def imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_every_import_points_down():
    upward = []
    for folder, floor in FLOORS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, name in imports(path):
                target = floor_of_import(name)
                if target is not None and target > floor:
                    upward.append(f"{path.relative_to(ROOT)}:{line}: floor {floor} imports "
                                  f"{name} (floor {target})")
    assert not upward, "\n".join(upward)


def test_the_ir_loads_nothing_above_it():
    code = ("import concordia_ir, concordia_ir.passes.safepoints, concordia_ir.passes.tracking, sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('concordia', 'backends', 'lowering', 'handlers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_generic_top_level_names_are_installed(tmp_path):
    import tomllib
    with open(ROOT / "pyproject.toml", "rb") as fh:
        tools = tomllib.load(fh)["tool"]["setuptools"]
    assert all(p.split(".")[0] in ("concordia", "concordia_ir") for p in tools["packages"])
    assert set(tools["package-dir"]) == {"concordia.backends", "concordia.lowering",
                                         "concordia.handlers"}
    probe = ("import importlib.util as u; "
             "print([n for n in ('backends', 'lowering', 'handlers') if u.find_spec(n)])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_public_entry_has_what_users_touch():
    import concordia
    for name in ("kernel", "Runtime", "Checkpointer", "KernelContext", "migrate",
                 "PersistentRuntime", "f32", "i32", "Ptr", "global_id", "LogError"):
        assert hasattr(concordia, name), name
    if not hasattr(concordia.Runtime, "launch"):
        pytest.fail("Runtime without launch")
