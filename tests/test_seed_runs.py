"""docs/SEED_RUNS.md is true: every seed command line has a row, every row's command is the seed's with additions,
and its ``--plan_only`` plan trains what the row says ViTFreeze's code trained (issue 24).

Each pre-training row's command runs in-process (``run_pretrain.main``) on the tiny demo data with a narrow model
(``OVERRIDES``: width, input size, per-GPU batch), keeping the row's depth, stages, epochs and FreezeOut flags. What is
checked does not depend on the overrides: t_i (from the row's t_0/scaling, recomputed here), α_i / lr, the stage
weights (recomputed from ViTFreeze's loss code), the weight decay of every parameter group, the LR floors. What
depends on the data size — unit 0's freeze step — is recomputed for the row's real ImageNet run (its per-GPU batch,
accumulation, GPUs, epochs) with the schedule the plan used, and against ViTFreeze's own rule j - W > t (T - W).
"""
from __future__ import annotations

import math
import re
import shlex
from fractions import Fraction
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / 'docs' / 'SEED_RUNS.md'
SEED_NOTES = REPO.parent / 'shared' / 'docs' / 'SEED_NOTES.md'
IMAGENET_TRAIN = 1281167
# what the in-process plan changes (none of it enters a checked constant); argparse keeps the last occurrence
OVERRIDES = ['--input_size', '64', '--embed_dim', '32', '--num_heads', '2', '--decoder_embed_dim', '16',
             '--batch_size', '2', '--accum_iter', '1', '--num_workers', '0', '--device', 'cpu', '--output_dir', '',
             '--plan_only']
# seed flags a command here may drop or change: launcher/placement, paths, and ViTFreeze's --debug (another meaning)
SEED_ONLY = {'world_size', 'master_port', 'data_path', 'output_dir', 'log_dir', 'finetune', 'resume', 'debug'}


def tables() -> Dict[str, Dict[str, str]]:
    """id -> {column: cell} for every row of the doc's tables whose first column is ``id``."""
    rows, header = {}, None
    for line in DOC.read_text().splitlines():
        if not line.startswith('|'):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if cells[0] == 'id':
            header = cells
        elif header and not set(cells[0]) <= set('-'):
            assert len(cells) == len(header), line
            rows[cells[0]] = dict(zip(header, cells))
    return rows


ROWS = tables()
PRETRAIN = [k for k in ROWS if k[0] in 'PL']
EVAL = [k for k in ROWS if k[0] == 'E']


def command(row: Dict[str, str]):
    """(script, nproc, flags) of the row's ``command here``."""
    argv = shlex.split(row['command here'].strip('`'))
    assert argv[0] == 'torchrun' and argv[1].startswith('--nproc_per_node='), argv[:2]
    return argv[2], int(argv[1].split('=')[1]), argv[3:]


def flag_values(argv: List[str]) -> Dict[str, object]:
    """--flag value / --flag (True) pairs, in order (the last occurrence wins)."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        assert a.startswith('--'), (a, argv)
        if '=' in a:
            k, v = a[2:].split('=', 1)
            out[k], i = v, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith('--'):
            out[a[2:]], i = argv[i + 1], i + 2
        else:
            out[a[2:]], i = True, i + 1
    return out


def seed_command(line_no: int) -> List[str]:
    """The seed's command starting at ``line_no`` (1-based), continuation lines joined, launcher prefix dropped."""
    lines = SEED_NOTES.read_text().splitlines()
    i, parts = line_no - 1, []
    while True:
        parts.append(lines[i].rstrip().rstrip('\\'))
        if not lines[i].rstrip().endswith('\\') and not lines[i].rstrip().endswith('.py'):
            break
        i += 1
    argv = shlex.split(' '.join(parts))
    k = next(j for j, a in enumerate(argv) if a.endswith('.py'))
    nproc = next(int(a.split('=')[1]) for a in argv if a.startswith('--nproc_per_node='))
    return [argv[k], str(nproc)] + argv[k + 1:]


# ---- the doc covers the notes -------------------------------------------------------------------------------------

def test_every_seed_command_line_has_a_row_with_the_seeds_flags():
    if not SEED_NOTES.is_file():
        pytest.skip(f'{SEED_NOTES} is not on this checkout')
    text = SEED_NOTES.read_text().splitlines()
    starts = [n + 1 for n, l in enumerate(text) if 'torch.distributed.launch' in l and
              re.search(r'run_(pretrain|finetune|linprobe|knn)\.py', ' '.join(text[n:n + 2]))]
    rows = {int(r['notes line']): k for k, r in ROWS.items() if r['notes line'].isdigit()}
    assert sorted(rows) == starts  # one row per command line, no row for a line that is not one
    for line_no, key in rows.items():
        script, nproc, flags = command(ROWS[key])
        seed = seed_command(line_no)
        assert (seed[0], int(seed[1])) == (script, nproc), key
        here, theirs = flag_values(flags), flag_values(seed[2:])
        for k, v in theirs.items():  # the command here is the seed's, with additions
            if k not in SEED_ONLY:
                assert str(here.get(k)) == str(v), (key, k, here.get(k), v)


# ---- pre-training rows ----------------------------------------------------------------------------------------------

_PLANS: Dict[str, dict] = {}


def run_plan(flags: List[str], demo_root, monkeypatch, capsys) -> dict:
    """``run_pretrain.py FLAGS OVERRIDES`` in-process; the schedule, param groups and model the run built."""
    key = ' '.join(flags)
    if key in _PLANS:
        return _PLANS[key]
    import run_pretrain
    from util.args import check_flags
    got: dict = {}

    def wrap(name, keep):
        orig = getattr(run_pretrain, name)

        def f(*a, **k):
            out = orig(*a, **k)
            got[keep] = out if keep in ('model', 'freezer') else a[0]
            return out
        monkeypatch.setattr(run_pretrain, name, f)
    wrap('build_freezer', 'freezer')
    wrap('param_group_summary', 'groups')
    wrap('build_model', 'model')
    argv = [a.replace('$IN1K/train', str(demo_root)).replace('$IN1K/demo_dataset', str(demo_root))
            for a in flags] + OVERRIDES
    parser = run_pretrain.get_args_parser()
    args = parser.parse_args(argv)
    check_flags(args, parser, argv)
    args.argv = argv
    capsys.readouterr()
    run_pretrain.main(args)
    got['out'], got['args'] = capsys.readouterr().out, args
    if got.get('freezer') is not None:  # the schedule policy's plan (the one --plan_only prints)
        got['schedule'] = got['freezer'].policy.schedule
    _PLANS[key] = got
    return got


def t_exact(i: int, n: int, t0: str, how: str) -> float:
    """t_i = s(t0 + (1 - t0) i / n) in exact arithmetic, the last unit 1."""
    x = Fraction(t0) + (1 - Fraction(t0)) * Fraction(i, n)
    return float(x ** {'linear': 1, 'squared': 2, 'cubic': 3}[how])


def vitfreeze_stage_weights(spec: str, num_stages: int) -> List[float]:
    """ViTFreeze's loss over S active stages, replayed: equal; `loss += L_k (S - k)`; `loss += L_k; loss *= S - k`;
    `loss += L_k / (k + 1)`."""
    coef = [0.0] * num_stages
    for k in range(num_stages):
        if spec == 'cum4321':
            coef[k] += 1.0
            coef = [c * (num_stages - k) for c in coef]
        else:
            coef[k] = {'equal': 1.0, '4321': float(num_stages - k), '1overk': 1.0 / (k + 1)}[spec]
    return coef


def _num(s: str) -> float:
    return float(Fraction(s)) if '/' in s else float(s)


@pytest.mark.parametrize('key', PRETRAIN)
def test_pretrain_row_plan(key, demo_root, monkeypatch, capsys, single_thread):
    row = ROWS[key]
    script, nproc, flags = command(row)
    assert script == 'run_pretrain.py'
    f = flag_values(flags)
    # the row's recipe columns are the command's
    epochs, warm = map(int, re.fullmatch(r'(\d+) \(warm-up (\d+)\)', row['epochs']).groups())
    assert (epochs, warm) == (int(f['epochs']), int(f['warmup_epochs']))
    b, a, n, eff, lr = re.fullmatch(r'(\d+) × (\d+) × (\d+) = (\d+) · ([0-9.e-]+)', row['batch · lr']).groups()
    b, a, n, eff = int(b), int(a), int(n), int(eff)
    assert (b, a, n) == (int(f['batch_size']), int(f.get('accum_iter', 1)), nproc) and eff == b * a * n
    assert float(f['blr']) * eff / 256 == pytest.approx(float(lr), rel=1e-9)

    plan = run_plan(flags, demo_root, monkeypatch, capsys)
    out, args, model, groups = plan['out'], plan['args'], plan['model'], plan['groups']
    sched = plan.get('schedule')
    kind = row['schedule']

    # stage weights: ViTFreeze's loss of that date, over all stages (nothing frozen yet)
    spec = re.match(r'`([^`]+)`', row['stage weights']).group(1)
    stages = 12 if f.get('all_stages') else 4
    want = vitfreeze_stage_weights(spec, stages)
    assert len(model.stage_blocks) == stages and model.stage_weights == pytest.approx(want, rel=1e-12)
    listed = row['stage weights'].split('`')[2].strip()
    if '…' not in listed and '×' not in listed:
        assert [_num(x) for x in listed.split(',')] == pytest.approx(want)
    assert f'stage weights {model.stage_weights}' in out

    # weight decay of every parameter group: matrices get the row's value, biases/norms/1-D 0
    wd = dict(re.findall(r'(units|embed|all) ([0-9.e-]+)', row['weight decay']))
    assert groups and any(g['weight_decay'] > 0 for g in groups) == any(float(v) > 0 for v in wd.values())
    for g in groups:
        matrices = all(p.ndim > 1 for p in g['params'])
        assert matrices or all(p.ndim <= 1 for p in g['params'])  # timm's split: no group mixes the two
        who = 'all' if 'unit' not in g else 'units' if g['unit'] >= 0 else 'embed'
        assert g['weight_decay'] == (float(wd[who]) if matrices else 0.0), (who, g.get('name'))
    assert 'AdamW weight decay (' in out

    floors = dict(re.findall(r'(units|global) ([0-9.e-]+)', row['LR floor']))
    if kind == 'none':
        assert sched is None and not args.freezeout and 'no FreezeOut' in out
        assert args.min_lr == float(floors['global']) and row['first freeze'] == '—'
        return
    assert kind.startswith('vitfreeze') and sched.freeze_schedule == 'vitfreeze'
    layerwise = 'non-layer-wise' not in kind
    scaled = kind.endswith(' scaled') if layerwise else not f.get('not_scale_lr')  # (unused without layer-wise LR)
    assert (sched.layerwise_lr, sched.scale_lr) == (layerwise, scaled)
    # t_i and alpha_i
    dfp = bool(f.get('dont_freeze_pe'))
    assert len(sched.units) == (12 if dfp else 13)
    n_units = len(sched.units) - 1
    for i, u in enumerate(sched.units):
        assert u.t == pytest.approx(t_exact(i, n_units, f['t_0'], f['how_scale']), rel=1e-12)
        assert u.alpha == pytest.approx(sched.lr / u.t if sched.scale_lr else sched.lr, rel=1e-12)
    # LR floors: a freezing unit's own curve ends at `units`, the global curve at `global`
    assert sched.min_lr == float(floors['global'])
    w, total = sched.warmup_steps, sched.total_steps
    for i, u in enumerate(sched.units):
        frozen = u.freeze_step is not None
        want_floor = float(floors['units']) if (layerwise and frozen) else float(floors['global'])
        assert sched.floor(i) == want_floor, (i, u.name)
        end = u.freeze_step or total
        for j in [j for j in (w, (w + total) // 2, end - 1) if w <= j < end]:
            if layerwise and frozen:
                x = want_floor + (u.alpha - want_floor) / 2 * (1 + math.cos(math.pi * (j - w) / (u.t * (total - w))))
                assert sched.lr_at(i, j) == pytest.approx(x, rel=1e-9, abs=1e-18)
            else:
                assert sched.lr_at(i, j) == sched.global_lr_at(j)
    assert 'LR floor: ' in out
    if layerwise:
        assert f'end their own curves at {float(floors["units"]):.3g} at their freeze step' in out

    # unit 0's freeze step in the row's real ImageNet run, here and by ViTFreeze's rule
    cell = row['first freeze']
    if cell.startswith('—'):
        assert key == 'P11'  # the debug run on ViTFreeze's demo data of unrecorded size
        return
    from freezeout import FreezeOutSchedule
    spe = (math.ceil(IMAGENET_TRAIN / n) // b) // a
    T, W = epochs * spe, warm * spe
    real = FreezeOutSchedule([u.name for u in sched.units], T, W, float(lr), sched.min_lr, sched.t_0,
                             sched.how_scale, scale_lr=sched.scale_lr, layerwise_lr=sched.layerwise_lr,
                             freeze_schedule=sched.freeze_schedule, unit_min_lr=sched.unit_min_lr)
    u0 = real.units[0]
    span = round(u0.t * (T - W), 6)  # exact arithmetic: 0.8**3 (T - W) is 28800.000000000004 in floats
    vit = W + math.floor(span) + 1 if W + span < T else None  # first j with j - W > t (T - W)
    if cell == 'never':
        assert u0.freeze_step is None and vit is None
        return
    ours = int(re.match(r'(\d+)', cell).group(1))
    assert u0.freeze_step == ours
    m = re.search(r'ViTFreeze (\d+), at LR 0', cell)
    if m:  # a whole F_0, layer-wise: ViTFreeze's extra step runs at a_0/2 (1 + cos pi) = 0
        assert layerwise and int(m.group(1)) == vit == ours + 1 and span == pytest.approx(round(span), abs=1e-6)
        assert u0.alpha / 2 * (1 + math.cos(math.pi * round(span) / span)) == 0.0
    else:
        assert vit == ours


# ---- evaluation rows ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('key', EVAL)
def test_eval_row_command_parses_and_is_its_recipe(key):
    import importlib
    from util import args as uargs
    row = ROWS[key]
    script, nproc, flags = command(row)
    parser = importlib.import_module(script[:-3]).get_args_parser()
    args = parser.parse_args(flags)
    assert uargs.domain_errors(args, parser, flags) == []
    if row['epochs'] != '—':
        epochs, warm = map(int, re.fullmatch(r'(\d+) \(warm-up (\d+)\)', row['epochs']).groups())
        assert (args.epochs, args.warmup_epochs) == (epochs, warm)
        b, a, n, eff, lr = re.fullmatch(r'(\d+) × (\d+) × (\d+) = (\d+) · ([0-9.e-]+)', row['batch · lr']).groups()
        b, a, n, eff = int(b), int(a), int(n), int(eff)
        assert (args.batch_size, args.accum_iter, nproc) == (b, a, n) and eff == b * a * n
        got_lr = args.lr if args.lr is not None else args.blr * eff / 256
        assert got_lr == pytest.approx(float(lr), rel=1e-9)
        assert args.weight_decay == float(row['weight decay'])
    else:
        assert row['batch · lr'] == f'{args.batch_size} × 1 × {nproc}'
    ref = re.match(r'([PL]\d+)', row['evaluates'])
    assert ref is None or ref.group(1) in ROWS


def test_presets_and_new_flag_are_declared():
    """The stage-weight preset the seed's mid-January runs used is a preset everywhere it is validated."""
    import models_mim
    import run_pretrain
    from util.args import domain_errors, run_defining
    assert 'cum4321' in models_mim.STAGE_WEIGHT_PRESETS
    for p in models_mim.STAGE_WEIGHT_PRESETS:
        assert models_mim.check_stage_weights('--stage_weights', p) is None
    parser = run_pretrain.get_args_parser()
    bad = ['--freezeout_weight_decay=-1e-5']
    assert any('--freezeout_weight_decay' in e for e in domain_errors(parser.parse_args(bad), parser, bad))
    assert 'freezeout_weight_decay' in run_defining(parser)  # a resume with another value is warned about
