"""torch.compile plumbing for ``--compile``: a toolchain probe that fails in one line, dynamo limits that never fall
back to eager silently, and the counters a run reports (compiled graphs, compile seconds)."""
import contextlib
import logging
import warnings
from typing import Dict

import torch

from util.errors import UserError

BACKENDS = ('inductor', 'aot_eager', 'eager')


def allow_variants(limit: int) -> None:
    """Let every compiled function keep ``limit`` variants (dynamo's default is 8) and make hitting the limit an
    error: dynamo's default on a hit is to run that frame eagerly from then on, which would silently lose the
    compiled speed (and hide a recompile storm)."""
    import torch._dynamo.config as dc
    dc.recompile_limit = max(int(dc.recompile_limit), int(limit))
    dc.fail_on_recompile_limit_hit = True


def check_toolchain(backend: str, device: torch.device) -> None:
    """Compile and run a 3-op function on ``device`` with ``backend`` (caches off, so a C++ compiler / Triton is
    really invoked); a failure becomes one ``UserError`` line, before any data is read."""
    if backend not in BACKENDS:
        raise UserError(f'--compile_backend {backend!r}: choose one of {", ".join(BACKENDS)}')
    ctx = contextlib.nullcontext()
    if backend == 'inductor':
        import torch._inductor.config as ic
        ctx = ic.patch(force_disable_caches=True)
    quiet = [logging.getLogger(n) for n in ('torch._inductor', 'torch._dynamo')]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:  # the failure is reported below in one line; torch's own warnings would bury it
            q.setLevel(logging.CRITICAL)
        with ctx, warnings.catch_warnings():
            warnings.simplefilter('ignore')
            fn = torch.compile(lambda x: (x * 2.0).sin().sum(), backend=backend, fullgraph=True)
            float(fn(torch.ones(8, device=device)))
    except Exception as e:  # any failure of the toolchain: compiler missing, Triton missing, broken install
        lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
        cause = f'{type(e).__name__}: {lines[0][:200]}' if lines else type(e).__name__
        need = 'Triton (pip install triton) and a CUDA toolkit' if device.type == 'cuda' else \
            'a C++ compiler (g++ or clang; $CXX names another)'
        raise UserError(f'--compile: torch.compile (backend {backend}) cannot build kernels on {device.type} '
                        f'({cause}); install {need}, use --compile_backend aot_eager, or drop --compile') from None
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


def stats() -> Dict[str, float]:
    """Process-wide dynamo counters: distinct graphs compiled so far and seconds spent in dynamo compiles (forward
    graphs; inductor compiles a backward graph lazily at its first use, which is not in this number)."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    return {'graphs': int(counters['stats'].get('unique_graphs', 0)),
            'seconds': float(sum(compilation_time_metrics.get('_compile.compile_inner', [])))}


@contextlib.contextmanager
def eager():
    """Run compiled modules eagerly inside (visualisation batches of another size: no recompile for them)."""
    with torch.compiler.set_stance('force_eager'):
        yield
