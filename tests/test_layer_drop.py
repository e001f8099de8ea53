"""Progressive layer dropping (--layer_drop THETA_BAR, --layer_drop_gamma; models_mim.LayerDrop): the schedule
theta(t) and p_l formulas, decisions a pure function of (seed, step) (reproducible, resume-exact) with the keep
frequency p_l, a dropped block really not run and without gradient, a kept block's residual branch scaled by 1/p_l,
the FreezeOut prefix never dropped, off by default and bit-identical at theta = 1, the plan's expected saving
against a brute-force sum, and through the CLI: theta per epoch in log.txt, an exact resume, one-line errors."""
import json
import math

import pytest
import torch

from cli_inproc import cli, resume_from_epoch0
from conftest import TINY_PRETRAIN_FLAGS
from freezeout import measure_unit_flops
from models_mim import LayerDrop, create_model
from util.errors import UserError

pytestmark = pytest.mark.usefixtures('single_thread')


def tiny(**kw):
    torch.manual_seed(0)
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                        decoder_embed_dim=16, **kw)


def test_schedule_formulas():
    ld = LayerDrop(0.5, 10.0, depth=4)
    for t in (0.0, 0.1, 0.7, 1.0):
        th = 0.5 * math.exp(-10 * t) + 0.5
        assert ld.theta(t) == pytest.approx(th)
        assert ld.keep_probs(t) == pytest.approx([1 - l / 4 * (1 - th) for l in (1, 2, 3, 4)])
    assert ld.keep_probs(0.0) == [1.0] * 4 and ld.plan == [1.0] * 4  # t = 0: the full network
    assert ld.keep_probs(1e9)[-1] == pytest.approx(0.5)  # the deepest block ends at theta_bar
    with pytest.raises(UserError):
        LayerDrop(1.5, 1.0, 4)


def test_decisions_reproducible_and_frequencies_match_p():
    a, b = LayerDrop(0.5, 10.0, 4, seed=3), LayerDrop(0.5, 10.0, 4, seed=3)
    assert [a.decisions(0.5, s) for s in range(20)] == [b.decisions(0.5, s) for s in range(20)]
    assert [a.decisions(0.5, s) for s in range(20)] != [LayerDrop(0.5, 10.0, 4, seed=4).decisions(0.5, s)
                                                       for s in range(20)]
    p = a.keep_probs(1.0)
    n = 4000
    kept = [0] * 4
    for s in range(n):
        d = a.decisions(1.0, s)
        for i, f in enumerate(d):
            assert f == 0.0 or f == pytest.approx(1 / p[i])
            kept[i] += f > 0
    assert [k / n for k in kept] == pytest.approx(p, abs=0.03)
    # no global RNG use: the model's masks and init are untouched by the draws
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a.set_step(0.5, 7)
    assert torch.equal(state, torch.get_rng_state())


def test_off_by_default_and_bit_identical_at_theta_one():
    ref = tiny()
    assert ref.layer_drop is None and not ref.follows_progress and ref.progress_record() == {}
    m = tiny(layer_drop=0.5)
    assert m.follows_progress and 'layer_drop' not in ''.join(m.state_dict())  # nothing new in checkpoints
    m.set_progress(0.0, step=0)  # theta(0) = 1: every block kept, factor exactly 1
    assert m.layer_drop.plan == [1.0] * 4
    x = torch.randn(2, 3, 32, 32)
    for model in (ref, m):
        model.train()
        torch.manual_seed(9)
        model(x)['loss'].backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ref.parameters(), m.parameters()) if p.grad is not None)


def test_dropped_block_not_run_no_grad_kept_block_scaled():
    m = tiny(layer_drop=0.5)
    m.train()
    calls = []
    for b, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, inp, out, b=b: calls.append(b))
    m.layer_drop.plan = [1.0, 0.0, 2.0, 1.25]  # block 2 dropped; blocks 3, 4 kept with p = 1/2, 4/5
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    out['loss'].backward()
    assert calls == [0, 2, 3]  # the dropped block's compute is skipped, not multiplied by 0
    assert all(p.grad is None for p in m.blocks[1].parameters())
    assert all(p.grad is not None for b in (0, 2, 3) for p in m.blocks[b].parameters())
    # the encoder by hand: identity for a dropped block, x + (f(x) - x) / p for a kept one
    torch.manual_seed(1)
    lat, mask, ids = m.forward_encoder(x, 0.75)
    torch.manual_seed(1)
    h = m.patch_embed(x) + m.pos_embed[:, 1:]
    h, _, _ = m.random_masking(h, 0.75)
    h = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), h], 1)
    h = m.blocks[0](h)
    taps = {m.stage_blocks[k]: k for k in range(len(m.stage_blocks))}
    h = h + (m.blocks[2](h) - h) * 2.0
    h = h + (m.blocks[3](h) - h) * 1.25
    assert torch.allclose(lat[taps[3]], m.norm[taps[3]](h))
    m.eval()  # evaluation: the full network, unscaled
    calls.clear()
    with torch.no_grad():
        m(x)
    assert calls == [0, 1, 2, 3]


def test_frozen_blocks_never_dropped():
    m = tiny(layer_drop=0.01, layer_drop_gamma=50)
    m.set_frozen(2, embed_frozen=True)
    plans = []
    for step in range(200):
        m.set_progress(0.9, step=step)
        plans.append(m.layer_drop.plan)
    assert all(p[0] == 1.0 and p[1] == 1.0 for p in plans)  # frozen: always run, unscaled
    assert any(p[3] == 0.0 for p in plans) and any(p[2] == 0.0 for p in plans)
    assert m.progress_record()['layer_drop_kept_share'] < 0.8


def test_expected_saving_matches_a_brute_force_sum():
    m = tiny(layer_drop=0.5, layer_drop_gamma=3)
    f = measure_unit_flops(m, 32, 0.75, torch.device('cpu'), time_targets=False)
    ld, T = m.layer_drop, 50
    enc = f['unit_enc_fwd'][1:]

    def frozen(step):
        return 0 if step < 20 else 2

    def base(step):  # the run without dropping: frozen blocks' forward only, their decoders off (a stand-in cost)
        return 1000.0 + 3 * sum(enc[frozen(step):])
    saved = sum(3 * enc[b] * (1 - ld.keep_probs(t / T)[b]) for t in range(T) for b in range(frozen(t), 4))
    want = saved / sum(base(t) for t in range(T))
    assert ld.expected_saving(f, T, frozen, [20], base_cost=base) == pytest.approx(want, rel=1e-9)
    plain = sum(3 * enc[b] * (1 - ld.keep_probs(t / T)[b]) for t in range(T) for b in range(4)) / (
        T * (f['shared_fwd'] + 3 * sum(f['unit_fwd'])))
    assert ld.expected_saving(f, T, lambda s: 0) == pytest.approx(plain, rel=1e-9)


def _args(demo_root, out, *extra):
    # 32 images, batch 8: 4 optimizer steps per epoch, T = 8 with 2 epochs
    return [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', out, '--epochs', '2', '--save_freq', '1',
            '--vis_freq', '0', *extra]


def test_plan_only_shows_the_expected_saving(demo_root):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, '', '--plan_only', '--layer_drop', '0.5'))
    assert rc == 0, err
    assert 'layer drop (PLD): theta_bar=0.5, gamma=100/T' in out
    assert 'layer drop: expected saving of training FLOPs (FLOP model): ' in out
    rc, out, err = cli('run_pretrain.py', _args(demo_root, '', '--plan_only', '--layer_drop', '0.5', '--t_0', '0.8',
                                                '--how_scale', 'cubic'))
    assert rc == 0 and '% of the FreezeOut run; with FreezeOut ' in out, err


def test_cli_logs_theta_and_resumes_exactly(demo_root, tmp_path):
    flags = ['--layer_drop', '0.3', '--layer_drop_gamma', '4']
    ref, res = tmp_path / 'ref', tmp_path / 'res'
    rc, out, err = cli('run_pretrain.py', _args(demo_root, ref, *flags, '--log_dir', ref / 'tb'))
    assert rc == 0, err[-3000:]
    recs = [json.loads(l) for l in (ref / 'log.txt').read_text().splitlines()]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(ref / 'tb')).Reload()
    assert [e.value for e in ea.Scalars('layer_drop/theta')] == pytest.approx([r['layer_drop_theta'] for r in recs])
    for r, j in zip(recs, (3, 7)):  # the epoch's last optimizer step j of T = 8
        assert r['layer_drop_theta'] == pytest.approx(0.7 * math.exp(-4 * j / 8) + 0.3)
        assert 0 < r['layer_drop_kept_share'] <= 1
    a, b, _, rb = resume_from_epoch0('run_pretrain.py', ref, res, lambda d: _args(demo_root, d, *flags))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    keep = ('train_loss', 'layer_drop_theta', 'layer_drop_kept_share', 'step')
    assert [{k: r[k] for k in keep} for r in recs] == [{k: r[k] for k in keep} for r in rb]


@pytest.mark.parametrize('extra,msg', [
    (['--layer_drop', '1.5'], 'error: --layer_drop 1.5: must be'),
    (['--layer_drop', '0.5', '--layer_drop_gamma', '-1'], 'error: --layer_drop_gamma -1.0: must be'),
])
def test_cli_errors_are_one_line(demo_root, tmp_path, extra, msg):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'o', *extra))
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(msg), err
    assert not (tmp_path / 'o').exists()


@pytest.mark.slow
def test_ddp_two_ranks_drop_the_same_blocks(demo_root, tmp_path):
    """gloo, 2 ranks with FreezeOut: both ranks draw the same dropped blocks (seed, step) and DDP is built with
    find_unused_parameters, so a step whose dropped blocks get no gradient reduces (without it the second step
    fails: checked by hand) through the freeze events to the end."""
    import subprocess
    import sys
    from reliability_common import free_port
    from cli_inproc import REPO
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           str(REPO / 'run_pretrain.py'), *map(str, _args(demo_root, out, '--layer_drop', '0.3', '--layer_drop_gamma',
                                                           '4', '--batch_size', '4', '--t_0', '0.5',
                                                           '--how_scale', 'linear'))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    recs = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines()]
    assert len(recs) == 2 and recs[-1]['frozen_units'] > 0 and 'layer_drop_theta' in recs[-1]
