"""The shape of the source tree: imports between packages (with upward ones marked) and the longest
functions. `python benchmarks/code_shape.py [SRC_DIR]` (default: this checkout's src/saelab)."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

RANK = {"errors": 0, "utils": 1, "sae": 2, "run_folder": 3, "data": 3, "models": 4, "train": 4, "evals": 5,
        "explore": 6, "report": 6, "pipeline": 7, "cli": 8, "__main__": 9}


def package_of(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else "saelab"


def imports(src: Path) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in src.rglob("*.py"):
        pkg = package_of(path, src)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("saelab.") and name.split(".")[1] != pkg:
                    edges[pkg].add(name.split(".")[1])
    return edges


def longest_functions(src: Path, n: int = 10) -> list[tuple[int, str]]:
    out = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(src)}:{node.name}"))
    return sorted(out, reverse=True)[:n]


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "src" / "saelab"
    print("imports between packages (^ = to a package of the same or a higher layer):")
    for pkg, targets in sorted(imports(src).items()):
        marks = [t + ("^" if pkg in RANK and t in RANK and RANK[t] >= RANK[pkg] else "") for t in sorted(targets)]
        print(f"  {pkg:11s} -> {', '.join(marks)}")
    print("longest functions (lines):")
    for lines, name in longest_functions(src):
        print(f"  {lines:4d}  {name}")


if __name__ == "__main__":
    main()
