"""Shared pytest fixtures. Keep each fixture small and session-scoped where it builds data on disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get('PYTEST_XDIST_WORKER'):
    # pytest -n 2 on the 2-core CI box: one intra-op thread per worker (two 2-thread torch processes on 2 cores slow
    # each other 5-7x); set before torch is imported so OpenMP starts with it, and inherited by the subprocesses
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # plain `pytest` (not `python -m pytest`) does not put the repo on sys.path

from util.demo_data import make_demo_dataset  # noqa: E402

# Module fixtures that train or launch many runs: every test using one belongs to the full suite (CI) only, not to the
# fast tier (`pytest -m "not slow"`). Marked here so the rule has one home and follows new tests that use them.
SLOW_FIXTURES = frozenset({'runs', 'cli_runs', 'bad_input_results', 'eval_bad_input_results'})


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, 'fixturenames', ())):
            item.add_marker(pytest.mark.slow)

# ---- data ------------------------------------------------------------------------------------------------------

DEMO_KW = dict(num_classes=4, train_per_class=8, val_per_class=4, size=32, seed=0)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny demo ImageFolder: 4 classes x (8 train + 4 val) images, 32 px; root holds train/ and val/. Read-only."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo_data", **DEMO_KW)


# ---- runtime -----------------------------------------------------------------------------------------------------


@pytest.fixture
def single_thread():
    """Run a test's tiny tensor ops on one intra-op thread (restored afterwards).

    The CI box has 2 shared cores; with 2 OpenMP threads and other processes on them, tiny forwards get ~20x
    slower from thread contention. Results do not depend on this (the tests compare within one setting).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- run_pretrain.py as a subprocess -----------------------------------------------------------------------------

# The tiny configuration of the CLI tests (see tests/test_pretrain_cli.py, tests/test_freezeout.py).
TINY_PRETRAIN_FLAGS = ['--input_size', '32', '--patch_size', '4', '--embed_dim', '64', '--depth', '4',
                       '--num_heads', '4', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu',
                       '--warmup_epochs', '1', '--blr', '1e-3']


def _pretrain_env(extra=None):
    import os

    env = dict(os.environ)
    # one intra-op thread: the same numerics in every run that a test compares, and no oversubscription when
    # several runs share the 2 CI cores
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('RANK', None), env.pop('WORLD_SIZE', None), env.pop('LOCAL_RANK', None)
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def run_pretrain():
    """``run_pretrain(args, env=None, timeout=300) -> CompletedProcess``: ``python run_pretrain.py *args`` in the
    repo root (text output captured); ``run_pretrain.many([args, ...])`` starts several at once and waits for all."""
    import subprocess

    script = str(REPO_ROOT / 'run_pretrain.py')

    def run(args, env=None, timeout=300):
        return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO_ROOT, env=_pretrain_env(env),
                              capture_output=True, text=True, timeout=timeout)

    def many(arg_lists, env=None, timeout=300, max_parallel=4):
        """Run every argument list (at most ``max_parallel`` at a time); results in the same order. ``env`` may be
        one dict for all or a list of dicts, one per run."""
        envs = env if isinstance(env, list) else [env] * len(arg_lists)
        results = [None] * len(arg_lists)
        running = []  # (index, Popen)
        todo = list(range(len(arg_lists)))

        def reap(index, proc):
            try:
                so, se = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                so, se = proc.communicate()
            results[index] = subprocess.CompletedProcess(proc.args, proc.returncode, so, se)

        while todo or running:
            while todo and len(running) < max_parallel:
                i = todo.pop(0)
                running.append((i, subprocess.Popen(
                    [sys.executable, script, *map(str, arg_lists[i])], cwd=REPO_ROOT, env=_pretrain_env(envs[i]),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            i, proc = running.pop(0)
            reap(i, proc)
        return results

    run.many = many
    return run


# ---- reliability tests: the shared reference runs (session-scoped; defined in tests/reliability_common.py) --------

from reliability_common import evaluated, existing, reference  # noqa: E402,F401
