"""tools/ and bench/ are packages: run as ``python -m tools.X`` / ``python -m bench.X`` from the repository root, each
module imported under one name only, no ``sys.path`` edits; ``python tools/X.py`` re-runs itself as the module."""
import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / 'tests')) if p not in sys.path]
from cli_inproc import cli  # noqa: E402

PACKAGES = ('tools', 'bench')
PROJECT_TOP = {p.stem for p in REPO.glob('*.py')} | {'util', *PACKAGES}  # what needs the repo root on sys.path


def modules() -> List[str]:
    return [f'{pkg}.{p.stem}' for pkg in PACKAGES for p in sorted((REPO / pkg).glob('*.py')) if p.stem != '__init__']


def _tree(module: str) -> ast.Module:
    return ast.parse((REPO / (module.replace('.', '/') + '.py')).read_text())


def _project_imports(tree: ast.AST) -> List[ast.stmt]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split('.')[0] in PROJECT_TOP for a in node.names):
            out.append(node)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split('.')[0] in PROJECT_TOP:
            out.append(node)
    return out


def test_both_are_packages_and_every_module_is_listed():
    assert (REPO / 'tools' / '__init__.py').is_file() and (REPO / 'bench' / '__init__.py').is_file()
    assert {'tools.sweep', 'tools.report', 'tools.export', 'tools.submitit_launch', 'tools.plot_schedule',
            'bench.pretrain_step'} <= set(modules())


@pytest.mark.parametrize('module', modules())
def test_no_sys_path_edits(module):
    """No ``sys.path`` (read or written) and no ``site.addsitedir`` anywhere in the module."""
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in (('sys', 'path'), ('site', 'addsitedir')), \
                f'{module}:{node.lineno} uses {node.value.id}.{node.attr}'


@pytest.mark.parametrize('module', modules())
def test_siblings_are_imported_through_their_package(module):
    """``import pretrain_step`` (bench/ on sys.path) would make a second copy of ``bench.pretrain_step``."""
    siblings = {m.split('.')[1] for m in modules()}
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        assert not siblings & {n.split('.')[0] for n in names}, f'{module}:{node.lineno} imports {names}'


@pytest.mark.parametrize('module', modules())
def test_file_spelling_reruns_as_the_module_before_any_project_import(module):
    """A module that imports the project has, before that import, the guard ``python tools/x.py`` goes through:
    ``if __name__ == '__main__' and not __package__: os.execv(python, [python, '-m', '<module>', *argv])``."""
    tree = _tree(module)
    imports = [n for n in _project_imports(tree) if n in tree.body]  # module level
    if not imports:
        return  # stdlib only (bench.experiments, bench.gpu_check): the file spelling works as it is
    guards = [n for n in tree.body if isinstance(n, ast.If) and "__package__" in ast.unparse(n.test)
              and "__name__ == '__main__'" in ast.unparse(n.test)]
    assert guards, f'{module}: no re-run guard'
    assert guards[0].lineno < imports[0].lineno, f'{module}: the guard comes after a project import'
    body = ast.unparse(guards[0])
    assert 'os.execv(sys.executable' in body and f"'-m', '{module}'" in body, body


def test_each_module_has_one_name_after_importing_all():
    for m in modules():
        importlib.import_module(m)
    files = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, '__file__', None)
        if f and Path(f).resolve().parent in [REPO / p for p in PACKAGES]:
            files.setdefault(Path(f).resolve(), []).append(name)
    assert files and all(len(names) == 1 and names[0].split('.')[0] in PACKAGES for names in files.values()), files


@pytest.mark.parametrize('module', modules())
def test_help_exits_0(module):
    rc, out, err = cli(module, ['--help'])
    assert rc == 0, err
    assert 'usage:' in out and 'Traceback' not in err


def test_old_file_spelling_still_works():
    """A real ``python tools/report.py --help`` from the repository root: the same usage as ``-m tools.report``."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    old = subprocess.run([sys.executable, 'tools/report.py', '--help'], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env)
    new = subprocess.run([sys.executable, '-m', 'tools.report', '--help'], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=env)
    assert old.returncode == new.returncode == 0, old.stderr + new.stderr
    assert old.stdout == new.stdout and 'usage:' in old.stdout
