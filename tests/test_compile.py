"""--compile with FreezeOut (LocalMIM.compile_regions): freezing takes effect in compiled regions, losses track the
eager run, recompiles stay bounded and never fall back to eager; via the CLI: resume of a compiled run across a
freeze event is exact and a missing compiler toolchain is one line before training.

Compilation is slow on the 2 shared CI cores (inductor's C++ build takes minutes for even the tiny model), so these
tests use the ``aot_eager`` backend: dynamo's graph capture, its guards (grad mode, train/eval, requires_grad) and
AOTAutograd's forward/backward graphs — everything a freeze event interacts with — without kernel generation.
Inductor itself is exercised by ``bench/gpu_check.py`` and ``bench/pretrain_step.py --compile``.
"""
import json
import shutil

import pytest
import torch

from conftest import TINY_PRETRAIN_FLAGS
from freezeout import FreezeOut, FreezeOutSchedule
from models_mim import create_model
from util import compile as uc

pytestmark = pytest.mark.usefixtures('single_thread')

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
# aot_eager runs the same aten ops as eager but through AOTAutograd's functionalised graphs (other op order in
# places): over 8 AdamW steps the losses agreed to ~1e-7 relative here; 1e-4 leaves room for other CPUs/BLAS
LOSS_RTOL = 1e-4


def _run(model, sched, steps, imgs, on_step=None):
    fo = FreezeOut(model, sched)
    opt = torch.optim.AdamW(fo.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))
    model.train()
    losses = []
    for j in range(steps):
        fo.step(opt, j)
        torch.manual_seed(100 + j)  # the same masks in both runs
        out = model(imgs, mask_ratio=0.75)
        out['loss'].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out['loss'].item())
        if on_step is not None:
            on_step(j, fo)
    return losses


@pytest.mark.slow
def test_compiled_freezeout_freezes_for_real_and_tracks_eager():
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    eager = create_model('MIM_vit_tiny_patch16', **TINY)
    torch.manual_seed(0)
    compiled = create_model('MIM_vit_tiny_patch16', **TINY)
    names = FreezeOut.unit_names(eager, False)
    # 5 units, linear t_0 0.3, T = 8, FreezeOut-paper schedule: freeze events at steps 3, 4, 6, 7 (the last unit
    # never freezes)
    sched = lambda: FreezeOutSchedule(names, 8, 1, 1e-3, 1e-6, t_0=0.3, how_scale='linear',
                                      freeze_schedule='freezeout')
    assert [u.freeze_step for u in sched().units] == [3, 4, 6, 7, None]
    ref = _run(eager, sched(), 8, imgs)

    limit = compiled.compile_regions(backend='aot_eager')
    import torch._dynamo.config as dc
    assert dc.fail_on_recompile_limit_hit and dc.recompile_limit >= limit
    units = compiled.units()
    snap, graphs = {}, {}
    base = uc.stats()['graphs']

    def check(j, fo):
        graphs[j] = uc.stats()['graphs'] - base
        for u in range(fo.num_frozen):
            if u not in snap:  # frozen at this step's boundary: its values now are final
                snap[u] = {n: p.detach().clone() for n, p in units[u].params.items()}
            for n, p in units[u].params.items():
                assert not p.requires_grad and p.grad is None, (j, n)
                assert torch.equal(p.detach(), snap[u][n]), f'{n} changed after its freeze (step {j})'
        for u in range(fo.num_frozen, len(units)):
            assert all(p.requires_grad for p in units[u].params.values())

    got = _run(compiled, sched(), 8, imgs, check)
    assert len(snap) == 4
    assert got == pytest.approx(ref, rel=LOSS_RTOL), (got, ref)
    # bounded variants: one new graph at the first event (the first block is fed by the frozen embedding's
    # detached output), one at the second (a frozen block in eval under no_grad), none at the last two events
    assert graphs[0] > 0 and graphs[3] == graphs[0] + 1 and graphs[4] == graphs[3] + 1, graphs
    assert graphs[7] == graphs[4] <= limit, graphs


@pytest.mark.slow
def test_cli_compiled_run_resumes_exactly(demo_root, run_pretrain, tmp_path):
    """~1.5 min on an idle 2-core box (two compiled processes one after the other); ~6 min under CI load."""
    common = [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root / 'train', '--epochs', '2', '--save_freq', '1',
              '--t_0', '0.3', '--how_scale', 'linear', '--freeze_schedule', 'freezeout', '--vis_freq', '0']
    comp = ['--compile', '--compile_backend', 'aot_eager']
    full, broken = run_pretrain.many([
        [*common, *comp, '--output_dir', tmp_path / 'full'],
        [*common, '--compile', '--output_dir', tmp_path / 'broken']],  # inductor without a C++ compiler
        env=[None, {'CXX': str(tmp_path / 'no-such-g++')}], timeout=900)
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-3000:]
    err = [l for l in broken.stderr.splitlines() if l.strip()]
    assert broken.returncode == 2 and len(err) == 1 and err[0].startswith('error: --compile: torch.compile '), \
        broken.stderr[-2000:]
    assert 'C++ compiler' in err[0] and not (tmp_path / 'broken' / 'log.txt').exists()
    assert 'FreezeOut: step' in full.stdout  # freeze events happened in the compiled run

    f = [json.loads(l) for l in (tmp_path / 'full' / 'log.txt').read_text().splitlines()]
    assert 0 < f[0]['frozen_units'] < f[1]['frozen_units']  # the resumed epoch 1 crosses freeze events too
    # graphs reported per epoch; the freeze events of epoch 1 add a bounded number of variants
    assert 0 < f[0]['compile_graphs'] <= f[1]['compile_graphs'] <= f[0]['compile_graphs'] + 8, f

    # resume the compiled run from its own epoch-0 checkpoint: the same epoch 1, bit for bit
    res = tmp_path / 'resumed'
    res.mkdir()
    shutil.copy(tmp_path / 'full' / 'checkpoint-0.pth', tmp_path / 'ck0.pth')
    p = run_pretrain([*common, *comp, '--output_dir', res, '--resume', tmp_path / 'ck0.pth'], timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    a = torch.load(tmp_path / 'full' / 'checkpoint-1.pth', weights_only=True)
    b = torch.load(res / 'checkpoint-1.pth', weights_only=True)
    assert a['step'] == b['step'] and a['freezeout'] == b['freezeout']
    for k, v in a['model'].items():
        assert torch.equal(v, b['model'][k]), k
