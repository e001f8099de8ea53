"""FreezeOut (freezeout.py): t_i, alpha_i, J_i and freeze steps against the formulas, LR at chosen steps, T from the
real loader, what freezing does to a real model + AdamW, the FLOP-model plan, and CLI validation."""
import math
import re
from fractions import Fraction

import pytest
import torch

from conftest import TINY_PRETRAIN_FLAGS
from freezeout import (FreezeOut, FreezeOutSchedule, format_plan, freeze_points, measure_unit_flops,
                       projected_saving, step_cost)
from models_mim import create_model
from util.errors import UserError
from util.lr_sched import steps_per_epoch, warmup_cosine

pytestmark = pytest.mark.usefixtures('single_thread')

S = {'linear': 1, 'squared': 2, 'cubic': 3}


def t_formula(i, n, t0, how):
    return (t0 + (1 - t0) * i / n) ** S[how]


def t_exact(i, n, t0: str, how) -> Fraction:
    t0 = Fraction(t0)
    return (t0 + (1 - t0) * Fraction(i, n)) ** S[how]


def lr_formula(j, alpha, min_lr, w, end):
    """Spec: warm-up ramps 0 -> alpha over W steps, then cosine from alpha to min_lr at `end`."""
    if j < w:
        return alpha * j / w
    return min_lr + (alpha - min_lr) * 0.5 * (1 + math.cos(math.pi * (j - w) / (end - w)))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)


# ---- t_i ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('how', ['linear', 'squared', 'cubic'])
@pytest.mark.parametrize('t0', [0.5, 0.8, 0.3])
@pytest.mark.parametrize('n_units', [5, 13])
def test_freeze_points_formula(how, t0, n_units):
    ts = freeze_points(n_units, t0, how)
    n = n_units - 1
    assert len(ts) == n_units
    for i, t in enumerate(ts):
        assert t == pytest.approx(t_formula(i, n, t0, how), abs=1e-15)
    assert ts[-1] == 1.0
    assert ts[0] == pytest.approx(t0 ** S[how])
    assert all(a < b for a, b in zip(ts, ts[1:]))  # increasing: the frozen set is a prefix


def test_cubic_08_first_unit_0512_and_t0_1_never_freezes():
    ts = freeze_points(13, 0.8, 'cubic')
    assert ts[0] == pytest.approx(0.512) and ts[-1] == 1.0
    # the FREEZEOUT.md table for the 12-block ViT with the embedding as unit 0 (denominator 12: "ViTFreeze" mapping)
    assert freeze_points(13, 0.8, 'squared')[0] == pytest.approx(0.64)
    assert freeze_points(13, 1.0, 'cubic') == [1.0] * 13
    sched = FreezeOutSchedule([f'u{i}' for i in range(13)], 1000, 100, 1e-3, 1e-6, t_0=1.0, how_scale='cubic')
    assert all(u.freeze_step is None for u in sched.units)
    assert sched.num_frozen_at(999) == 0 and sched.steps_in_state()[0] == 1000


@pytest.mark.parametrize('bad', [0.0, -0.1, 1.5])
def test_freeze_points_bad_t0(bad):
    with pytest.raises(UserError, match='--t_0'):
        freeze_points(5, bad, 'cubic')


def test_freeze_points_bad_scaling():
    with pytest.raises(UserError, match='--how_scale'):
        freeze_points(5, 0.8, 'quartic')


# ---- alpha_i, J_i, freeze steps ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('scale_lr', [True, False])
@pytest.mark.parametrize('how,t0', [('cubic', '0.8'), ('linear', '0.5'), ('squared', '0.7'), ('cubic', '0.9')])
@pytest.mark.parametrize('total', [12, 97, 1000, 100000])
def test_alpha_and_freeze_steps(scale_lr, how, t0, total):
    names = [f'u{i}' for i in range(13)]
    lr = 1.5e-4
    sched = FreezeOutSchedule(names, total, total // 10, lr, 1e-6, t_0=float(t0), how_scale=how, scale_lr=scale_lr,
                              freeze_schedule='freezeout')
    assert [u.name for u in sched.units] == names
    for i, u in enumerate(sched.units):
        t = t_exact(i, 12, t0, how)
        assert u.t == pytest.approx(float(t), rel=1e-12)
        assert u.alpha == pytest.approx(lr / float(t) if scale_lr else lr, rel=1e-12)
        assert u.end_step == pytest.approx(float(t * total), rel=1e-12)
        if t < 1:
            # first optimizer step j with j >= J_i (exact rational arithmetic: no float off-by-one)
            assert u.freeze_step == math.ceil(t * total), (i, float(t * total))
            assert sched.num_frozen_at(u.freeze_step) >= i + 1
            assert sched.num_frozen_at(u.freeze_step - 1) <= i
        else:
            assert u.freeze_step is None
    assert sum(sched.steps_in_state()) == total


# ---- LR at chosen steps -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('how', ['linear', 'squared', 'cubic'])
@pytest.mark.parametrize('scale_lr', [True, False])
def test_layerwise_lr_at_steps(how, scale_lr):
    total, warm, lr, min_lr = 1000, 100, 1e-3, 1e-6
    sched = FreezeOutSchedule([f'u{i}' for i in range(5)], total, warm, lr, min_lr, t_0=0.5, how_scale=how,
                              scale_lr=scale_lr, freeze_schedule='freezeout')
    for i, u in enumerate(sched.units):
        t = t_formula(i, 4, 0.5, how)
        alpha = lr / t if scale_lr else lr
        end = t * total
        steps = [0, 1, 50, 99, 100, 101, int(end) - 1, (100 + int(end)) // 2]
        for j in steps:
            if j >= end:
                continue
            assert sched.lr_at(i, j) == pytest.approx(lr_formula(j, alpha, min_lr, warm, end), rel=1e-9, abs=1e-15)
        # warm-up ramps to alpha exactly at W, and the cosine ends at min_lr at J_i
        assert sched.lr_at(i, warm) == pytest.approx(alpha)
        assert sched.lr_at(i, 0) == 0.0
        assert lr_formula(end, alpha, min_lr, warm, end) == pytest.approx(min_lr)
        if u.freeze_step is not None:
            # the last active step's LR is just above min_lr (close to the end of the unit's cosine)
            last = u.freeze_step - 1
            assert min_lr <= sched.lr_at(i, last) <= lr_formula(last, alpha, min_lr, warm, end) + 1e-15
    # t = 1: the per-unit curve IS the global one, bit for bit
    for j in [0, 7, 100, 333, 999]:
        assert sched.lr_at(4, j) == sched.global_lr_at(j) == warmup_cosine(j, lr, min_lr, warm, total)


def test_non_layerwise_lr_is_global_curve_but_still_freezes():
    total, warm, lr, min_lr = 200, 20, 2e-3, 1e-6
    sched = FreezeOutSchedule([f'u{i}' for i in range(5)], total, warm, lr, min_lr, t_0=0.5, how_scale='linear',
                              scale_lr=True, layerwise_lr=False, freeze_schedule='freezeout')
    for i in range(5):
        for j in [0, 10, 20, 21, 90, 99]:
            assert sched.lr_at(i, j) == pytest.approx(lr_formula(j, lr, min_lr, warm, total), rel=1e-12)
            assert sched.lr_at(i, j) == sched.global_lr_at(j)
    assert [u.freeze_step for u in sched.units] == [100, 125, 150, 175, None]


def test_freezeout_step_sets_group_lrs_and_dont_freeze_pe():
    model = tiny_model()
    total, warm, lr, min_lr = 40, 8, 1e-3, 1e-6
    names = FreezeOut.unit_names(model, dont_freeze_pe=True)
    assert names == ['block1', 'block2', 'block3', 'block4']
    sched = FreezeOutSchedule(names, total, warm, lr, min_lr, t_0=0.5, how_scale='squared', freeze_schedule='freezeout')
    # blocks are units 0..N-1: the first block freezes at s(t_0), the last at 1
    assert sched.units[0].t == pytest.approx(0.25) and sched.units[-1].t == 1.0
    fo = FreezeOut(model, sched, dont_freeze_pe=True)
    groups = fo.param_groups(0.05)
    assert {g['unit'] for g in groups} == {-1, 0, 1, 2, 3}
    embed_params = {id(p) for g in groups if g['unit'] == -1 for p in g['params']}
    assert embed_params == {id(p) for p in model.units()[0].params.values()}
    # weight-decay rule: none for biases / 1-D params
    biases = {id(p) for n, p in model.named_parameters() if n.endswith('.bias')}
    for g in groups:
        for p in g['params']:
            assert (g['weight_decay'] == 0.0) == (p.ndim <= 1 or id(p) in biases)
    assert sum(len(g['params']) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    for j in [0, 3, 8, 9]:
        assert fo.step(opt, j) is False
        for g in opt.param_groups:
            if g['unit'] < 0:
                assert g['lr'] == warmup_cosine(j, lr, min_lr, warm, total)
            else:
                u = sched.units[g['unit']]
                assert g['lr'] == pytest.approx(lr_formula(j, lr / u.t, min_lr, warm, u.end_step), rel=1e-9,
                                                abs=1e-15)
    # block 1 freezes at ceil(0.25 * 40) = 10; the embedding never does
    assert fo.step(opt, 10) is True
    assert fo.num_frozen == 1 and model.num_frozen_blocks == 1 and model.embed_frozen is False
    assert {g['unit'] for g in opt.param_groups} == {-1, 1, 2, 3}
    assert all(p.requires_grad for p in model.units()[0].params.values())


# ---- the ViTFreeze schedule (the default) -------------------------------------------------------------------------

def vit_lr_formula(j, lr, alpha, min_lr, w, t, total):
    """Issue 9 §1: warm-up to the global lr, then alpha's cosine from W over t (T - W) steps to min_lr."""
    if j < w:
        return lr * j / w
    return min_lr + (alpha - min_lr) / 2 * (1 + math.cos(math.pi * (j - w) / (t * (total - w))))


@pytest.mark.parametrize('how', ['linear', 'squared', 'cubic'])
@pytest.mark.parametrize('scale_lr', [True, False])
def test_vitfreeze_lr_and_freeze_steps(how, scale_lr):
    total, warm, lr, min_lr = 1000, 100, 1e-3, 1e-6
    sched = FreezeOutSchedule([f'u{i}' for i in range(5)], total, warm, lr, min_lr, t_0=0.5, how_scale=how,
                              scale_lr=scale_lr)
    assert sched.freeze_schedule == 'vitfreeze'  # the default
    for i, u in enumerate(sched.units):
        t = t_formula(i, 4, 0.5, how)
        alpha = lr / t if scale_lr else lr
        assert u.alpha == pytest.approx(alpha, rel=1e-12)
        # freeze at W + t (T - W) (exact rationals: no float off-by-one)
        f = Fraction(warm) + t_exact(i, 4, '0.5', how) * (total - warm)
        assert u.end_step == pytest.approx(float(f), rel=1e-12)
        assert u.freeze_step == (math.ceil(f) if f < total else None)
        # W - 1: every unit is on the global ramp, bit for bit; W: the jump to alpha
        assert sched.lr_at(i, warm - 1) == sched.global_lr_at(warm - 1) == lr * (warm - 1) / warm
        assert sched.lr_at(i, warm) == pytest.approx(alpha, rel=1e-12)
        mid = warm + round(t * (total - warm) / 2)
        last = (u.freeze_step or total) - 1
        for j in (0, 50, warm, warm + 1, mid, last):
            assert sched.lr_at(i, j) == pytest.approx(vit_lr_formula(j, lr, alpha, min_lr, warm, t, total),
                                                      rel=1e-9, abs=1e-15), (i, j)
        if u.freeze_step is not None:
            assert sched.lr_at(i, mid) == pytest.approx(min_lr + (alpha - min_lr) / 2, rel=2e-2)
            assert sched.num_frozen_at(u.freeze_step) >= i + 1 and sched.num_frozen_at(u.freeze_step - 1) <= i
            assert min_lr <= sched.lr_at(i, last) < min_lr + (alpha - min_lr) * 1e-3
    # t = 1: the global curve exactly
    for j in (0, 99, 100, 555, 999):
        assert sched.lr_at(4, j) == sched.global_lr_at(j) == warmup_cosine(j, lr, min_lr, warm, total)


def test_vitfreeze_non_layerwise_and_min_lr_0_is_vitfreeze_curve():
    total, warm, lr = 200, 20, 2e-3
    sched = FreezeOutSchedule([f'u{i}' for i in range(5)], total, warm, lr, 1e-6, t_0=0.5, how_scale='linear',
                              layerwise_lr=False)
    for i in range(5):
        for j in (0, 19, 20, 21, 90, 110):
            assert sched.lr_at(i, j) == sched.global_lr_at(j) == warmup_cosine(j, lr, 1e-6, warm, total)
    # still frozen after W + t (T - W): t = .5 .625 .75 .875 -> 110, 132.5, 155, 177.5; non-layer-wise a whole F_i
    # still trains at step F_i (its LR is the global one, not 0), as ViTFreeze's j - W > t (T - W)
    assert [u.freeze_step for u in sched.units] == [111, 133, 156, 178, None]
    # --min_lr 0: ViTFreeze's own lr_i = a_i/2 (1 + cos(pi (j - W) / (t_i (T - W))))
    s0 = FreezeOutSchedule([f'u{i}' for i in range(5)], total, warm, lr, 0.0, t_0=0.5, how_scale='linear')
    for i, u in enumerate(s0.units[:-1]):
        for j in range(warm, u.freeze_step):
            assert s0.lr_at(i, j) == pytest.approx(u.alpha / 2 * (1 + math.cos(math.pi * (j - warm) /
                                                                                (u.t * (total - warm)))), rel=1e-12)


def test_vitfreeze_dont_freeze_pe_with_a_real_optimizer():
    model = tiny_model()
    total, warm, lr, min_lr = 40, 8, 1e-3, 1e-6
    sched = FreezeOutSchedule(FreezeOut.unit_names(model, True), total, warm, lr, min_lr, t_0=0.5,
                              how_scale='squared')
    fo = FreezeOut(model, sched, dont_freeze_pe=True)
    opt = torch.optim.AdamW(fo.param_groups(0.05), lr=lr, betas=(0.9, 0.95))
    # t = 1/4, 4/9, 25/36, 1 -> freeze at 8 + t * 32 = 16, 22.2, 30.2, never
    assert [u.freeze_step for u in sched.units] == [16, 23, 31, None]
    for j in (warm - 1, warm, 12, 15):
        assert fo.step(opt, j) is False
        for g in opt.param_groups:
            if g['unit'] < 0:  # the embedding: the global schedule, never frozen
                assert g['lr'] == warmup_cosine(j, lr, min_lr, warm, total)
            else:
                u = sched.units[g['unit']]
                assert g['lr'] == pytest.approx(vit_lr_formula(j, lr, lr / u.t, min_lr, warm, u.t, total),
                                                rel=1e-9), (g['unit'], j)
    assert fo.step(opt, 16) is True and fo.num_frozen == 1 and not model.embed_frozen
    assert {g['unit'] for g in opt.param_groups} == {-1, 1, 2, 3}


@pytest.mark.parametrize('freeze_schedule', ['vitfreeze', 'freezeout'])
@pytest.mark.parametrize('lr_schedule', ['cosine', 'constant'])
def test_t0_1_is_the_global_schedule_bit_for_bit(freeze_schedule, lr_schedule):
    from util.lr_sched import WarmupCosine
    total, warm, lr, min_lr = 97, 13, 3e-4, 1e-6
    sched = FreezeOutSchedule([f'u{i}' for i in range(13)], total, warm, lr, min_lr, t_0=1.0, how_scale='cubic',
                              freeze_schedule=freeze_schedule, lr_schedule=lr_schedule)
    plain = WarmupCosine(lr, min_lr, warm, total, shape=lr_schedule)
    assert sched.state_boundaries() == []
    for j in range(total):
        assert {sched.lr_at(i, j) for i in range(13)} == {plain.lr_at(j)}, j


@pytest.mark.parametrize('freeze_schedule', ['vitfreeze', 'freezeout'])
def test_constant_lr_holds_the_peak_then_a_cosine_tail_to_the_freeze_step(freeze_schedule):
    from util.lr_sched import WarmupCosine
    total, warm, lr, min_lr, tail = 1000, 100, 1e-3, 1e-6, 0.2
    sched = FreezeOutSchedule([f'u{i}' for i in range(5)], total, warm, lr, min_lr, t_0=0.5, how_scale='linear',
                              freeze_schedule=freeze_schedule, lr_schedule='constant', constant_tail=tail)
    plain = WarmupCosine(lr, min_lr, warm, total, shape='constant')
    for j in (0, 50, 99, 100, 500, 999):  # plain constant: the ramp, then the peak to the end
        assert plain.lr_at(j) == sched.global_lr_at(j) == (lr * j / warm if j < warm else lr)
    for i, u in enumerate(sched.units[:-1]):
        alpha = lr / u.t
        end = u.end_step
        assert end == pytest.approx(warm + u.t * (total - warm) if freeze_schedule == 'vitfreeze' else u.t * total)
        start = end - tail * (end - warm)
        ramp = lr if freeze_schedule == 'vitfreeze' else alpha
        assert sched.lr_at(i, warm - 1) == pytest.approx(ramp * (warm - 1) / warm, rel=1e-12)
        for j in (warm, warm + 1, math.floor(start) - 1):  # holding the peak
            assert sched.lr_at(i, j) == alpha
        for j in (math.ceil(start), round((start + end) / 2), u.freeze_step - 1):  # the tail
            want = min_lr + (alpha - min_lr) / 2 * (1 + math.cos(math.pi * (j - start) / (end - start)))
            assert sched.lr_at(i, j) == pytest.approx(want, rel=1e-9), (i, j)
        assert sched.lr_at(i, u.freeze_step - 1) < alpha * 0.01  # nothing freezes at a high LR
    assert sched.lr_at(4, 999) == lr  # the never-frozen unit holds to the end, like the plain run
    # non-layerwise: the global (constant) curve for everyone, frozen at the same steps, except that vitfreeze still
    # trains a unit at a whole F_i (550, 775 here: its LR there is the global peak), as ViTFreeze's j - W > t (T - W)
    nl = FreezeOutSchedule([f'u{i}' for i in range(5)], total, warm, lr, min_lr, t_0=0.5, how_scale='linear',
                           freeze_schedule=freeze_schedule, lr_schedule='constant', layerwise_lr=False)
    want = [u.freeze_step for u in sched.units]
    if freeze_schedule == 'vitfreeze':
        assert want == [550, 663, 775, 888, None]
        want = [551, 663, 776, 888, None]
    assert [u.freeze_step for u in nl.units] == want
    assert all(nl.lr_at(i, j) == plain.lr_at(j) for i in range(5) for j in (0, 99, 100, 600))


def test_schedule_flag_errors():
    with pytest.raises(UserError, match='--freeze_schedule'):
        FreezeOutSchedule(['a', 'b'], 10, 1, 1e-3, 0.0, freeze_schedule='paper')
    with pytest.raises(UserError, match='--lr_schedule'):
        FreezeOutSchedule(['a', 'b'], 10, 1, 1e-3, 0.0, lr_schedule='step')
    with pytest.raises(UserError, match='--constant_tail'):
        FreezeOutSchedule(['a', 'b'], 10, 1, 1e-3, 0.0, constant_tail=1.5)


# ---- T from the real loader, through the CLI plan ----------------------------------------------------------------------

PLAN_ROW = re.compile(r'^\s*(\d+)\s+(\S+)\s+([\d.]+)\s+([\d.]+e[+-]\d+)\s+([\d.]+)\s+(\d+|never)\s+(\S+)', re.M)


def _parse_plan(text):
    m = re.search(r'T=(\d+) optimizer steps \((\d+)/epoch\), warm-up W=(\d+)', text)
    assert m, text
    rows = [(int(a), b, float(c), float(d), float(e), None if f == 'never' else int(f), g)
            for a, b, c, d, e, f, g in PLAN_ROW.findall(text)]
    saving = re.search(r'projected saving[^\n]*?:\s*(-?[\d.]+)%', text)
    return tuple(int(x) for x in m.groups()), rows, (float(saving.group(1)) if saving else None)


BS, ACCUM, EPOCHS = 4, 2, 3


@pytest.fixture(scope='module')
def cli_runs(demo_root, run_pretrain):
    """--plan_only runs on the demo data (batch 4, --accum_iter 2, --world_size 1, 3 epochs) and a bad --t_0."""
    flags = [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--batch_size', BS, '--accum_iter', ACCUM,
             '--epochs', EPOCHS, '--world_size', 1, '--how_scale', 'cubic', '--t_0', 0.8, '--plan_only',
             '--output_dir', '', '--freeze_schedule', 'freezeout']
    runs = {'cubic': flags, 'nolw': flags + ['--not_scale_lr', '--non_layerwise_lr'], 't1': flags + ['--t_0', '1'],
            'bad_t0': flags + ['--t_0', '1.5'],
            'vit': flags + ['--freeze_schedule', 'vitfreeze', '--not_scale_lr'],
            'vit_default': [f for f in flags if f not in ('--freeze_schedule', 'freezeout')],
            'const': flags + ['--lr_schedule', 'constant', '--constant_tail', '0.25']}
    return dict(zip(runs, run_pretrain.many(list(runs.values()), max_parallel=4)))


def test_plan_only_total_steps_from_loader_accum_and_world_size(demo_root, cli_runs):
    from util.datasets import build_dataset, build_loader, pretrain_transform
    warm = 1
    ds = build_dataset(demo_root, 'train', pretrain_transform(32), allow_root=True, seed=0)
    loader = build_loader(ds, BS, shuffle=True, drop_last=True, num_workers=0, pin_mem=False, seed=0,
                          distributed=False, world_size=1, rank=0)
    spe = steps_per_epoch(len(loader), ACCUM)
    assert (len(ds), len(loader), spe) == (32, 8, 4)
    total, w = spe * EPOCHS, spe * warm
    eff_batch = BS * ACCUM * 1
    lr = 1e-3 * eff_batch / 256
    res_cubic, res_nolw, res_t1 = cli_runs['cubic'], cli_runs['nolw'], cli_runs['t1']
    for r in (res_cubic, res_nolw, res_t1):
        assert r.returncode == 0, r.stderr[-2000:]
    (T, per_epoch, W), rows, saving = _parse_plan(res_cubic.stdout)
    assert (T, per_epoch, W) == (total, spe, w)
    assert f'effective batch size: {eff_batch}' in res_cubic.stdout
    sched = FreezeOutSchedule([f'u{i}' for i in range(5)], total, w, lr, 1e-6, t_0=0.8, how_scale='cubic')
    assert [r[1] for r in rows] == ['embed', 'block1', 'block2', 'block3', 'block4']
    for (idx, name, t, alpha, end, fstep, epoch), u in zip(rows, sched.units):
        assert t == pytest.approx(u.t, abs=1e-4)
        assert alpha == pytest.approx(lr / u.t, rel=1e-3)
        assert end == pytest.approx(u.t * total, abs=0.05)
        assert fstep == (math.ceil(u.t * total - 1e-9) if u.t < 1 else None)
        if fstep is not None:
            assert float(epoch) == pytest.approx(fstep / spe, abs=0.005)
    assert rows[0][5] == math.ceil(0.512 * 12) == 7 and rows[-1][5] is None
    assert saving is not None and 0 < saving < 100
    # unscaled, non-layerwise: every unit starts at lr; same freeze steps
    assert 'scale_lr=False, layerwise_lr=False' in res_nolw.stdout
    _, rows_nolw, _ = _parse_plan(res_nolw.stdout)
    assert [r[5] for r in rows_nolw] == [r[5] for r in rows]
    assert all(r[3] == pytest.approx(lr, rel=1e-3) for r in rows_nolw)
    # --t_0 1: nothing freezes, nothing saved
    _, rows_t1, saving_t1 = _parse_plan(res_t1.stdout)
    assert len(rows_t1) == 5 and all(r[5] is None for r in rows_t1)
    assert saving_t1 == 0.0


def test_plan_only_vitfreeze_is_the_default_with_accumulation(cli_runs):
    """The seed command lines plan the ViTFreeze schedule by default: freeze steps W + t_i (T - W), from the real T
    (loader length, --accum_iter 2), the schedule named, the cls-token difference stated in the header."""
    total, spe, w = 12, 4, 4
    lr = 1e-3 * BS * ACCUM / 256
    default, unscaled = _ok_stdout(cli_runs['vit_default']), _ok_stdout(cli_runs['vit'])
    for text, scale in ((default, True), (unscaled, False)):
        (T, per_epoch, W), rows, saving = _parse_plan(text)
        assert (T, per_epoch, W) == (total, spe, w)
        assert 'schedule: vitfreeze (ViTFreeze' in text and 'cls token: frozen with unit 0' in text
        for (idx, name, t, alpha, end, fstep, epoch) in rows:
            tt = t_exact(idx, 4, '0.8', 'cubic')
            f = w + tt * (total - w)
            assert t == pytest.approx(float(tt), abs=1e-4)
            assert alpha == pytest.approx(lr / float(tt) if scale else lr, rel=1e-3)
            assert end == pytest.approx(float(f), abs=0.05)
            assert fstep == (math.ceil(f) if f < total else None)
        assert [r[5] for r in rows] == [9, 9, 10, 11, None]  # 4 + 8 t_i: 8.10, 8.91, 9.83, 10.86
        assert ('LR jumps x' in text) == scale
    assert 'FreezeOut plan' not in cli_runs['bad_t0'].stdout
    # --lr_schedule constant reaches the plan: same freeze steps as the cosine run, the tail named
    const = _ok_stdout(cli_runs['const'])
    assert 'constant LR: hold the peak after warm-up, a freezing unit anneals to its LR floor over the last 0.25' in const
    assert [r[5] for r in _parse_plan(const)[1]] == [r[5] for r in _parse_plan(_ok_stdout(cli_runs['cubic']))[1]]


def _ok_stdout(res):
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_cli_rejects_bad_t0_subprocess(cli_runs):
    r = cli_runs['bad_t0']
    assert r.returncode == 2
    assert 'Traceback' not in r.stderr and 'FreezeOut plan' not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --t_0 1.5') and '(0, 1]' in lines[0], r.stderr


@pytest.mark.parametrize('flags,needle', [(['--t_0', '0'], 'error: --t_0 0'), (['--t_0', '-0.2'], 'error: --t_0 -0.2'),
                                          (['--how_scale', 'quartic'], "invalid choice: 'quartic'")])
def test_cli_rejects_bad_t0_and_how_scale(flags, needle, demo_root, monkeypatch, capsys):
    """Same entry point as the command line (run_main), in-process: exit status 2, a one-line message, no
    traceback. argparse's own choice check prints its usage block before the one error line."""
    import sys
    import run_pretrain
    argv = [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--epochs', 1, '--plan_only', '--output_dir', '', *flags]
    monkeypatch.setattr(sys, 'argv', ['run_pretrain.py', *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_pretrain.run_main(run_pretrain.main, run_pretrain.get_args_parser())
    assert e.value.code == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert 'Traceback' not in err and 'FreezeOut plan' not in cap.out
    last = err.splitlines()[-1]
    assert 'error:' in last and needle in last, err
    if '--t_0' in flags:
        assert len(err.splitlines()) == 1 and err.startswith('error: --t_0') and '(0, 1]' in err


# ---- freezing a real model with a real AdamW -----------------------------------------------------------------------

class Calls:
    def __init__(self):
        self.n = 0

    def __call__(self, *a):
        self.n += 1


def _train_steps(model, fo, opt, steps, imgs, hooks_per_step=None):
    for j in steps:
        fo.step(opt, j)
        out = model(imgs, mask_ratio=0.75)
        out['loss'].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hooks_per_step is not None:
            hooks_per_step(j, out)


def test_freezing_real_model_and_adamw():
    model = tiny_model()
    model.train()
    # 5 units (embed + 4 blocks), linear t_0 0.3: t = .3 .475 .65 .825 1; T=10 -> freeze steps 3, 5, 7, 9
    sched = FreezeOutSchedule(FreezeOut.unit_names(model, False), 10, 2, 1e-3, 1e-6, t_0=0.3, how_scale='linear',
                              freeze_schedule='freezeout')
    assert [u.freeze_step for u in sched.units] == [3, 5, 7, 9, None]
    fo = FreezeOut(model, sched)
    opt = torch.optim.AdamW(fo.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))
    units = model.units()
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    dec_calls = [Calls() for _ in model.decoder]
    handles = [d.register_forward_hook(lambda m, i, o, c=c: c()) for d, c in zip(model.decoder, dec_calls)]
    hog_stages = []
    orig_hog_forward = model.hog.forward
    model.hog.forward = lambda imgs, stages=None: (hog_stages.append(list(stages)), orig_hog_forward(imgs, stages))[1]
    hist_cells = []  # cell sizes for which a histogram is built from pixels (coarser ones are pooled from it)
    orig_hist = model.hog._histogram
    model.hog._histogram = lambda mag, bins, cell: (hist_cells.append(cell), orig_hist(mag, bins, cell))[1]
    block_out = {}
    handles += [b.register_forward_hook(lambda m, i, o, k=k: block_out.__setitem__(k, o.requires_grad))
                for k, b in enumerate(model.blocks)]

    _train_steps(model, fo, opt, range(3), imgs)
    assert fo.num_frozen == 0 and all(c.n == 3 for c in dec_calls)
    assert model.cell_sizes == [1, 2, 4, 8] and hist_cells == [1, 1, 1]  # one pixel pass per step, finest cell
    assert all(block_out.values())
    assert hog_stages[-1] == [0, 1, 2, 3]

    # step 3: unit 0 (patch embed + cls token) freezes
    _train_steps(model, fo, opt, [3], imgs)
    assert fo.num_frozen == 1 and model.embed_frozen and model.num_frozen_blocks == 0
    embed = units[0].params
    snap = {n: p.detach().clone() for n, p in embed.items()}
    opt_params = {id(p) for g in opt.param_groups for p in g['params']}
    for n, p in embed.items():
        assert not p.requires_grad and p.grad is None, n
        assert id(p) not in opt_params, n
        assert p not in opt.state, n
    # everything still active has AdamW state after the steps so far
    assert all(p in opt.state for u in units[1:] for p in u.params.values())

    # steps 4..6: block1 freezes at 5 (no stage), block2 (feeds stages 0 and 2) at 7
    _train_steps(model, fo, opt, [4, 5, 6], imgs)
    assert fo.num_frozen == 2 and model.num_frozen_blocks == 1
    assert block_out[0] is False, 'the frozen prefix must run under no_grad'
    assert block_out[1] is True
    before = [c.n for c in dec_calls]
    snap1 = {n: p.detach().clone() for n, p in units[1].params.items()}
    snap2 = {n: p.detach().clone() for n, p in units[2].params.items()}
    snap3 = {n: p.detach().clone() for n, p in units[3].params.items()}

    stage_keys = []
    hist_cells.clear()
    _train_steps(model, fo, opt, [7, 8], imgs, hooks_per_step=lambda j, out: stage_keys.append(sorted(out['stage_losses'])))
    assert fo.num_frozen == 3 and model.num_frozen_blocks == 2
    assert model.active_stages() == [1, 3]
    # stages 0 and 2 (fed by the frozen block 2): decoders not run, HOG targets not computed, no loss
    assert dec_calls[0].n == before[0] and dec_calls[2].n == before[2]
    assert dec_calls[1].n == before[1] + 2 and dec_calls[3].n == before[3] + 2
    assert hog_stages[-2:] == [[1, 3], [1, 3]]
    assert hist_cells == [2, 2], 'the 1-px cells of the frozen stage 0 must not be computed any more'
    assert stage_keys == [[1, 3], [1, 3]]
    assert block_out[0] is False and block_out[1] is False and block_out[2] is True

    # further steps change nothing that is frozen; grads None; no optimizer trace
    for n, p in embed.items():
        assert torch.equal(p, snap[n]), n
    for unit, sn in ((units[1], snap1), (units[2], snap2)):
        for n, p in unit.params.items():
            assert torch.equal(p, sn[n]), n
            assert p.grad is None and not p.requires_grad, n
            assert p not in opt.state, n
    opt_params = {id(p) for g in opt.param_groups for p in g['params']}
    for u in units[:3]:
        assert not any(id(p) in opt_params for p in u.params.values()), u.name
    assert sorted({g['unit'] for g in opt.param_groups}) == [3, 4]
    # the still-active unit 3 (block 3 with no stage) did move during steps 7 and 8
    assert all(not torch.equal(p, snap3[n]) for n, p in units[3].params.items() if p.ndim > 1)
    # step 9: unit 3 freezes before the step and stays put; the last unit (t = 1) keeps training
    snap3 = {n: p.detach().clone() for n, p in units[3].params.items()}
    snap4 = {n: p.detach().clone() for n, p in units[4].params.items()}
    _train_steps(model, fo, opt, [9], imgs)
    assert fo.num_frozen == 4 and model.num_frozen_blocks == 3
    assert all(torch.equal(p, snap3[n]) for n, p in units[3].params.items())
    assert all(not torch.equal(p, snap4[n]) for n, p in units[4].params.items() if p.ndim > 1)
    assert sorted({g['unit'] for g in opt.param_groups}) == [4]
    assert set(opt.state) == set(units[4].params.values())
    for h in handles:
        h.remove()


def test_dont_freeze_pe_backward_reaches_patch_embed():
    model = tiny_model(1)
    model.train()
    names = FreezeOut.unit_names(model, dont_freeze_pe=True)
    sched = FreezeOutSchedule(names, 10, 2, 1e-3, 1e-6, t_0=0.3, how_scale='linear')
    fo = FreezeOut(model, sched, dont_freeze_pe=True)
    opt = torch.optim.AdamW(fo.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))
    fo.step(opt, sched.units[1].freeze_step)  # blocks 1 and 2 frozen
    assert fo.num_frozen == 2 and model.num_frozen_blocks == 2 and not model.embed_frozen
    outs = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o.requires_grad))
             for k, b in enumerate(model.blocks)]
    out = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
    out['loss'].backward()
    assert outs[0] is True and outs[1] is True, 'with a trainable embedding the frozen blocks must keep the graph'
    assert model.patch_embed.proj.weight.grad is not None and model.cls_token.grad is not None
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    for b in (0, 1):
        for n, p in model.blocks[b].named_parameters():
            assert p.grad is None and not p.requires_grad, (b, n)
    assert all(p.grad is not None for p in model.blocks[2].parameters())
    assert sorted(out['stage_losses']) == [1, 3]
    for h in hooks:
        h.remove()


# ---- plan and FLOP model ----------------------------------------------------------------------------------------------

def _equal_cost_flops(n_units, c=10.0):
    return {'names': [f'u{i}' for i in range(n_units)], 'unit_fwd': [c] * n_units,
            'unit_enc_fwd': [c] * n_units, 'total_fwd': c * n_units, 'shared_fwd': 0.0}


@pytest.mark.parametrize('how,t0', [('cubic', 0.8), ('linear', 0.5), ('cubic', 0.9), ('squared', 0.6)])
def test_projected_saving_equal_cost_closed_form(how, t0):
    n_units, total = 13, 1200
    sched = FreezeOutSchedule([f'u{i}' for i in range(n_units)], total, 100, 1e-3, 1e-6, t_0=t0, how_scale=how,
                              freeze_schedule='freezeout')
    flops = _equal_cost_flops(n_units)
    # step_cost: active unit 3x forward (backward = 2x), frozen unit 1x (forward only, under no_grad)
    assert step_cost(flops, 0, False) == 3 * 10 * n_units
    assert step_cost(flops, 4, False) == 3 * 10 * (n_units - 4) + 10 * 4
    # per unit: saving 2c on every step after its freeze step -> 2/3 * mean_i (1 - f_i / T)
    f = [u.freeze_step if u.freeze_step is not None else total for u in sched.units]
    closed = 2 / 3 * sum(1 - fi / total for fi in f) / n_units
    assert projected_saving(sched, flops, False) == pytest.approx(closed, rel=1e-12)
    # and the continuum version 2/3 (1 - mean t) within discretisation
    mean_t = sum(u.t for u in sched.units) / n_units
    assert projected_saving(sched, flops, False) == pytest.approx(2 / 3 * (1 - mean_t), abs=2 / total)
    # dont_freeze_pe: the (never frozen) embed is unit -1 of the cost table, frozen blocks still pay 2x (forward +
    # input-grad backward): per frozen unit-step the saving is c instead of 2c
    sched_pe = FreezeOutSchedule([f'u{i}' for i in range(n_units - 1)], total, 100, 1e-3, 1e-6, t_0=t0,
                                 how_scale=how, freeze_schedule='freezeout')
    f_pe = [u.freeze_step if u.freeze_step is not None else total for u in sched_pe.units]
    closed_pe = sum(10 * (total - fi) for fi in f_pe) / (3 * 10 * n_units * total)
    assert projected_saving(sched_pe, flops, True) == pytest.approx(closed_pe, rel=1e-12)


def test_fourteen_pct_reference_number():
    """FREEZEOUT.md: cubic 0.8 on 12 equal blocks (+ embedding as unit 0 of 13) -> ~16.1% ("ViTFreeze" mapping)."""
    sched = FreezeOutSchedule([f'u{i}' for i in range(13)], 100000, 0, 1e-3, 1e-6, t_0=0.8, how_scale='cubic')
    flops = _equal_cost_flops(13)
    flops['unit_fwd'][0] = flops['unit_enc_fwd'][0] = 0.0  # embedding cost ~ 0; 12 equal blocks
    assert projected_saving(sched, flops, False) == pytest.approx(0.161, abs=0.002)


def test_measured_flops_and_format_plan():
    model = tiny_model()
    flops = measure_unit_flops(model, 32, 0.75, torch.device('cpu'))
    assert flops['names'] == ['embed', 'block1', 'block2', 'block3', 'block4']
    assert all(f > 0 for f in flops['unit_fwd'])
    # identical blocks cost the same encoder FLOPs; units with decoders cost more
    enc = flops['unit_enc_fwd'][1:]
    assert max(enc) == pytest.approx(min(enc), rel=1e-6)
    assert flops['unit_fwd'][2] > flops['unit_enc_fwd'][2] and flops['unit_fwd'][1] == flops['unit_enc_fwd'][1]
    assert flops['total_fwd'] == pytest.approx(sum(flops['unit_fwd']) + flops['shared_fwd'])
    # measuring does not consume the global RNG
    torch.manual_seed(3)
    a = torch.rand(3)
    torch.manual_seed(3)
    measure_unit_flops(model, 32, 0.75, torch.device('cpu'))
    assert torch.equal(torch.rand(3), a)

    sched = FreezeOutSchedule(flops['names'], 12, 4, 6.25e-5, 1e-6, t_0=0.3, how_scale='linear',
                              freeze_schedule='freezeout')
    text = format_plan(sched, 4, flops)
    for u in sched.units:
        assert re.search(rf'^\s*{u.index}\s+{u.name}\s', text, re.M), u.name
    pct = float(re.search(r'projected saving.*?:\s*([\d.]+)%', text).group(1))
    assert pct == pytest.approx(100 * projected_saving(sched, flops, False), abs=0.05)
    assert 0 < pct < 100
    assert 'end <= warm-up' in text  # unit 0: J = 3.6 <= W = 4
    assert 'schedule: freezeout (FreezeOut paper' in text and 'cls token: frozen with unit 0' in text
    text_pe = format_plan(FreezeOutSchedule(flops['names'][1:], 12, 4, 6.25e-5, 1e-6, 0.3, 'linear'), 4, flops,
                          dont_freeze_pe=True)
    assert 'embed' in text_pe and 'never' in text_pe and 'backward still runs through frozen blocks' in text_pe
    text_t1 = format_plan(FreezeOutSchedule(flops['names'], 12, 4, 6.25e-5, 1e-6, 1.0, 'cubic'), 4, flops)
    assert len(re.findall(r'^\s*\d+ \S+ .* never ', text_t1, re.M)) == 5 and ': 0.0%' in text_t1


def test_flop_model_counts_attention_once_whatever_the_kernel():
    """The FLOP model counts a block's attention as its two matmuls (4·N²·C) whether the model runs fused SDPA
    (not seen by the CPU counter, seen by the CUDA one) or the explicit path: a ViT block's forward equals the
    formula with the attention term exactly once."""
    import timm.models.vision_transformer as tv
    from models_mim import create_model
    torch.manual_seed(0)
    model = create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    assert all(m.fused_attn for m in model.modules() if isinstance(m, tv.Attention))
    flops = measure_unit_flops(model, 32, 0.75, torch.device('cpu'), time_targets=False)
    n, c = 64 // 4 + 1, 64  # tokens (the 16 visible patches and the class token) and width
    block = 2 * n * c * 3 * c + 4 * n * n * c + 2 * n * c * c + 2 * (2 * n * c * 4 * c)
    # unit 'block1' (blocks.0) feeds no stage at depth 4: its count is the block alone
    assert flops['unit_enc_fwd'][1] == pytest.approx(block, rel=1e-9)
    assert all(m.fused_attn for m in model.modules() if isinstance(m, tv.Attention))  # restored
