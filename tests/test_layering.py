"""Layering as a rule: each layer imports only the layers below it, and no cycle closes between
packages. Checked twice: what a fresh interpreter holds after importing a layer (module-level
imports), and every import statement in the source (the lazy ones inside functions too).

    0  m3ae.utils, m3ae.config                      helpers, the typed-config checker
    1  model | data | recipes                        tensors in, tensors out; samples in, batches out;
                                                     side by side: none imports another
       m3ae (the public API: m3ae/__init__, m3ae.api) the one layer-1 module family that joins them
    2  viz (the drawing functions)                   pictures of model outputs
    3  engine                                        device, precision, distributed, run directory,
                                                     checkpoints, metrics, optimisers, the loop
    4  train, eval (the tasks)                       pretraining, transfer, demo
    5  interop, viz.report, every *.cli, m3ae.cli,   conversion, export, reports, command lines
       m3ae.__main__
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "m3ae"


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[-1] in ("cli", "__main__") or module in ("m3ae.viz.report",) or parts[:2] == ["m3ae", "interop"]:
        return 5
    top = parts[1] if len(parts) > 1 else ""
    return {"utils": 0, "config": 0, "": 1, "api": 1, "model": 1, "data": 1, "recipes": 1, "viz": 2, "engine": 3,
            "train": 4, "eval": 4}[top]


def modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imports(module: str) -> set[str]:
    """Every m3ae module `module` names in an import statement, wherever the statement stands."""
    path = SRC.joinpath(*module.split("."))
    is_package = path.is_dir()
    path = path / "__init__.py" if is_package else path.with_suffix(".py")
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            candidates = [name] + ([f"{name}.{a.name}" for a in node.names])
            found |= {c for c in candidates if c.startswith("m3ae") and c in ALL}
            if name.startswith("m3ae") and name not in ALL:
                found.add(name)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("m3ae")}
    return found


ALL = set(modules())


def test_the_layer_table_covers_every_module():
    assert all(0 <= layer(m) <= 5 for m in ALL)


def test_no_import_statement_reaches_a_layer_above():
    upward = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                    for m in ALL for d in imports(m) if layer(d) > layer(m))
    assert not upward, "\n".join(upward)


def package(m: str) -> str:
    return ".".join(m.split(".")[:2])


PUBLIC_API = {"m3ae", "m3ae.api"}


def test_the_bottom_packages_stand_side_by_side():
    # model knows no data and data knows no model: the tasks pass sizes and tokenizer names between
    # them; only the public API (which builds a model with its transforms) joins the two.
    between = sorted(f"{m} imports {d}" for m in ALL - PUBLIC_API for d in imports(m)
                     if layer(m) == layer(d) == 1 and package(m) != package(d))
    assert not between, "\n".join(between)


def test_no_import_cycle_between_packages():
    # every command-line module is the top layer whichever package holds it (viz/cli.py calls the
    # evaluation library, which draws with viz's plotting functions): they count as one unit here
    def unit(m: str) -> str:
        return "command line" if m.rpartition(".")[2] == "cli" else package(m)

    graph: dict[str, set[str]] = {}
    for m in ALL:
        graph.setdefault(unit(m), set()).update(unit(d) for d in imports(m) if unit(d) != unit(m))
    # a cycle needs an edge back from a package a reaches; the root package is the public API of model
    for a, targets in graph.items():
        seen, todo = set(), list(targets)
        while todo:
            b = todo.pop()
            if b in seen:
                continue
            seen.add(b)
            todo += graph.get(b, ())
        assert a not in seen or a == "m3ae", f"import cycle through {a}"


def _loaded(*names: str) -> set[str]:
    code = (f"import sys, json\nimport {', '.join(names)}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'm3ae' or m.startswith('m3ae.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}).stdout
    return {m for m in json.loads(out) if m in ALL}


@pytest.mark.parametrize("level", range(5))
def test_a_fresh_interpreter_importing_a_layer_loads_nothing_above_it(level):
    # Python runs the root package first whatever is imported, and it loads the public model API
    # (layer 1): like `import torch`, by design; everything else is measured against that baseline.
    baseline = _loaded("m3ae")
    assert max(layer(m) for m in baseline) <= 1
    extra = _loaded(*sorted(m for m in ALL if layer(m) == level)) - baseline
    assert not [m for m in extra if layer(m) > level], sorted(extra)


def test_no_import_cycle_between_modules_of_the_data_package():
    # sources -> synth -> writer -> sources was one, hidden by a lazy import; the factory sits above
    # the readers, the generator and the writer so that none of them needs to import it back.
    data = {m for m in ALL if package(m) == "m3ae.data"}
    for start in data:
        seen, todo = set(), [d for d in imports(start) if d in data]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += [d for d in imports(m) if d in data]
        assert start not in seen, f"import cycle through {start}"
