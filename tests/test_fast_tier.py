"""The fast tier (``pytest -m "not slow"``, the edit-test loop) touches every project module.

Read statically from the tests' source, so it fails the moment a module is added without a fast test, or the last
fast test of a module is marked slow: a fast test touches a module when its body (or a same-file fixture it uses)
names something imported from it, or names the program (``run_pretrain.py``, ``tools.sweep``, ``bench/scaling.py``);
a touched module touches what it imports (that code runs on import).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, Set

from conftest import SLOW_FIXTURES

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ('util', 'tools', 'bench')


def project_modules() -> Dict[str, Path]:
    """``dotted name -> file`` of every project module (the root's .py files and the three packages, no __init__)."""
    files = [p for p in REPO.glob('*.py')] + [p for pkg in PACKAGES for p in (REPO / pkg).glob('*.py')]
    return {'.'.join(p.relative_to(REPO).with_suffix('').parts): p for p in files if p.name != '__init__.py'}


def _imports(tree: ast.AST, modules: Iterable[str]) -> Dict[str, str]:
    """``local name -> project module`` for the imports of ``tree`` (any depth: tests import inside functions)."""
    modules = set(modules)
    out: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    out[(a.asname or a.name).split('.')[0]] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f'{node.module}.{a.name}'
                if full in modules:  # from tools import sweep
                    out[a.asname or a.name] = full
                elif node.module in modules:
                    out[a.asname or a.name] = node.module
    return out


def _is_slow(node: ast.AST) -> bool:
    # a parametrize with some params marked slow leaves the others in the fast tier
    return any(ast.unparse(d) == 'pytest.mark.slow' for d in getattr(node, 'decorator_list', ()))


def _program_names(name: str) -> Set[str]:
    """The spellings a test uses to run module ``name`` as a program."""
    return {name, name.replace('.', '/') + '.py'}


def fast_touches(modules: Dict[str, Path]) -> Dict[str, str]:
    """``module -> first fast test touching it directly`` over tests/test_*.py."""
    spellings = {s: m for m in modules for s in _program_names(m)}
    found: Dict[str, str] = {}
    for path in sorted((REPO / 'tests').glob('test_*.py')):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Assign) and any(getattr(t, 'id', '') == 'pytestmark' for t in n.targets)
               and 'pytest.mark.slow' in ast.unparse(n.value) for n in tree.body):
            continue
        names = _imports(tree, modules)
        funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for fname, fn in funcs.items():
            if not fname.startswith('test_') or _is_slow(fn):
                continue
            args = {a.arg for a in fn.args.args}
            if args & SLOW_FIXTURES:
                continue
            bodies = [fn] + [funcs[a] for a in args if a in funcs]  # same-file fixtures it uses
            for body in bodies:
                for node in ast.walk(body):
                    mod = None
                    if isinstance(node, ast.Name) and node.id in names:
                        mod = names[node.id]
                    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                        mod = spellings.get(node.value)
                    if mod is not None:
                        found.setdefault(mod, f'{path.name}::{fname}')
    return found


def import_closure(start: Iterable[str], modules: Dict[str, Path]) -> Set[str]:
    graph = {m: set(_imports(ast.parse(p.read_text()), modules).values()) for m, p in modules.items()}
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def test_every_module_is_touched_by_a_fast_test():
    modules = project_modules()
    assert {'run_pretrain', 'engine_pretrain', 'freezeout', 'util.args', 'tools.sweep', 'bench.scaling'} <= set(modules)
    direct = fast_touches(modules)
    missing = sorted(set(modules) - import_closure(direct, modules))
    assert not missing, f'modules no fast test touches (add a test without @pytest.mark.slow): {missing}'


def test_the_scan_sees_marks_fixtures_and_program_names(tmp_path, monkeypatch):
    """The scanner itself: a slow mark, a slow fixture and a file-level slow mark hide a test; a program name counts."""
    import sys
    tests = tmp_path / 'tests'
    tests.mkdir()
    (tmp_path / 'alpha.py').write_text('import beta\n')
    (tmp_path / 'beta.py').write_text('')
    (tmp_path / 'gamma.py').write_text('')
    (tmp_path / 'delta.py').write_text('')
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    slow_fixture = sorted(SLOW_FIXTURES)[0]
    (tests / 'test_a.py').write_text(
        'import pytest\nimport gamma\nfrom alpha import thing\n\n'
        '@pytest.mark.slow\ndef test_slow():\n    gamma.x\n\n'
        f'def test_fixture({slow_fixture}):\n    gamma.x\n\n'
        'def test_fast():\n    thing()\n')
    (tests / 'test_b.py').write_text('import pytest\npytestmark = pytest.mark.slow\n\ndef test_x():\n    run("delta.py")\n')
    monkeypatch.setattr(sys.modules[__name__], 'REPO', tmp_path)
    modules = project_modules()
    assert set(modules) == {'alpha', 'beta', 'gamma', 'delta'}
    direct = fast_touches(modules)
    assert direct == {'alpha': 'test_a.py::test_fast'}
    assert import_closure(direct, modules) == {'alpha', 'beta'}
    (tests / 'test_b.py').write_text('def test_x(run):\n    run("delta.py")\n')
    assert set(fast_touches(modules)) == {'alpha', 'delta'}
