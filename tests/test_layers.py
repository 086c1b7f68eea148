"""The package's layers import only downward, with no cycle and no private name crossing modules.

    cli -> pipeline -> pipeline_config, report, explore -> evals -> train, models -> data, run_folder -> sae -> utils
    -> errors
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "saelab"
RANK = {"errors": 0, "utils": 1, "sae": 2, "run_folder": 3, "data": 3, "models": 4, "train": 4, "evals": 5,
        "explore": 6, "report": 6, "pipeline_config": 6, "pipeline": 7, "cli": 8, "__main__": 9}


def _imports():
    """(module, package, imported saelab module, names) for every import in the source tree."""
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        parts = module.split(".")
        package = parts[1] if len(parts) > 1 and parts[1] != "__init__" else "saelab"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saelab."):
                yield module, package, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("saelab."):
                        yield module, package, alias.name, []


def test_every_package_has_a_rank():
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert packages == set(RANK)


def test_imports_only_look_down():
    upward = []
    for module, package, target, _ in _imports():
        target_pkg = target.split(".")[1]
        if package == "saelab" or target_pkg == package:
            continue
        if RANK[target_pkg] >= RANK[package]:
            upward.append(f"{module} imports {target} ({package} {RANK[package]} -> {target_pkg} {RANK[target_pkg]})")
    assert not upward, "\n".join(upward)


def test_no_private_name_is_imported_from_another_module():
    private = [f"{module} imports {name} from {target}" for module, _, target, names in _imports()
               for name in names if name.startswith("_") and target != module]
    assert not private, "\n".join(private)


def test_a_package_gives_its_names_whatever_was_imported_first():
    """The packages give their public names on first use (utils/lazy.py). Importing a module binds it on its
    package under its own name: saelab.explore.spliced, imported by explore.attribution, hid the function spliced
    that saelab.explore gives. In a fresh process, every module imported first, no public name is a module."""
    script = """
import importlib, pkgutil, types, saelab
found = [m for m in pkgutil.walk_packages(saelab.__path__, "saelab.") if not m.name.endswith("__main__")]
modules = [importlib.import_module(m.name) for m in found]
packages = [saelab, *(module for module, m in zip(modules, found) if m.ispkg)]
print(sorted(f"{p.__name__}.{n}" for p in packages for n in getattr(p, "__all__", ())
             if isinstance(getattr(p, n), types.ModuleType)))
"""
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
