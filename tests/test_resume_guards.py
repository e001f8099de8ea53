"""One-line refusals instead of silently wrong runs (issue 25, "Also"): non-finite weights are neither evaluated
(run_knn, run_linprobe, run_finetune) nor exported; ``--dont_freeze_pe`` added or dropped on resume (pre-training
and fine-tuning); stage weights that leave every active stage at 0 after a freeze. Each: exit 2, one ``error:``
line naming what to change. In-process runs of the scripts' ``__main__`` (tests/cli_inproc.py)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / 'tests')) if p not in sys.path]
from cli_inproc import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures('single_thread')

ARCH = ['--input_size', '32', '--patch_size', '4', '--embed_dim', '64', '--depth', '4', '--num_heads', '4']
COMMON = [*ARCH, '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--seed', '3']
PRE = ['--model', 'MIM_vit_tiny_patch16', *COMMON, '--warmup_epochs', '1', '--blr', '1e-2']
FREEZE = ['--how_scale', 'linear', '--t_0', '0.3', '--freeze_schedule', 'freezeout']
FT = ['--model', 'vit_tiny_patch16', *COMMON, '--lr', '1e-2', '--warmup_epochs', '1', *FREEZE]


def one_error(rc, out: str, err: str) -> str:
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    msg = lines[0]  # the freezer's refusal names the resumed file: compared without it
    return re.sub(r'^error: --resume \S+\.pth: ', 'error: --resume: ', msg) if 'FreezeOut units' in msg else msg


# ---- non-finite weights -------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def nan_ckpt(tmp_path_factory) -> Path:
    """A tiny pre-training checkpoint whose blocks.2.mlp.fc1.weight diverged (2 NaN values, 1 inf)."""
    import models_mim
    torch.manual_seed(0)
    mim = models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4,
                                  num_heads=4)
    sd = mim.state_dict()
    sd['blocks.2.mlp.fc1.weight'].view(-1)[:3] = torch.tensor([float('nan'), float('nan'), float('inf')])
    path = tmp_path_factory.mktemp('nan') / 'checkpoint-3.pth'
    torch.save({'model': sd, 'epoch': 3, 'args': dict(model='MIM_vit_tiny_patch16', input_size=32, patch_size=4,
                                                      embed_dim=64, depth=4, num_heads=4)}, path)
    return path


def _nan_line(flag: str, path: Path) -> str:
    return (f'error: {flag} {path}: tensor blocks.2.mlp.fc1.weight holds NaN/inf (3 of 16384 values): the weights '
            f'diverged before this file was written; use an earlier checkpoint')


@pytest.mark.parametrize('script', ['run_knn.py', 'run_linprobe.py', 'run_finetune.py'])
def test_evaluators_refuse_non_finite_weights(script: str, nan_ckpt: Path, demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / 'out'
    rc, so, se = cli(script, [*COMMON, '--finetune', nan_ckpt, '--data_path', demo_root, '--output_dir', out,
                              '--epochs', '1'] if script != 'run_knn.py' else
                     [*COMMON, '--finetune', nan_ckpt, '--data_path', demo_root, '--output_dir', out])
    assert one_error(rc, so, se) == _nan_line('--finetune', nan_ckpt)
    assert not (out / 'log.txt').exists() and not list(out.glob('checkpoint-*'))


def test_finetune_resume_refuses_non_finite_weights(demo_root: Path, tmp_path: Path) -> None:
    import models_vit
    torch.manual_seed(0)
    vit = models_vit.create_model('vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                  num_classes=4)
    sd = vit.state_dict()
    sd['head.bias'][1] = float('inf')
    path = tmp_path / 'ft.pth'
    torch.save({'model': sd, 'epoch': 0, 'args': {'model': 'vit_tiny_patch16'}}, path)
    rc, so, se = cli('run_finetune.py', [*COMMON, '--resume', path, '--data_path', demo_root, '--output_dir',
                                         tmp_path / 'out', '--epochs', '2', '--eval'])
    assert one_error(rc, so, se) == (f'error: --resume {path}: tensor head.bias holds NaN/inf (1 of 4 values): the '
                                     f'weights diverged before this file was written; use an earlier checkpoint')


def test_export_refuses_non_finite_weights(nan_ckpt: Path, tmp_path: Path) -> None:
    rc, so, se = cli('tools/export.py', ['--checkpoint', nan_ckpt, '--output', tmp_path / 'vit.pth'])
    assert one_error(rc, so, se) == _nan_line('--checkpoint', nan_ckpt)
    assert list(tmp_path.iterdir()) == []


# ---- --dont_freeze_pe changed on resume ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def pretrained(demo_root: Path, tmp_path_factory) -> Path:
    """3 epochs with FreezeOut (checkpoint-0: nothing frozen; checkpoint-1: embed and block1 frozen)."""
    out = tmp_path_factory.mktemp('pre') / 'out'
    rc, so, se = cli('run_pretrain.py', [*PRE, *FREEZE, '--epochs', '3', '--save_freq', '1', '--data_path',
                                         demo_root, '--output_dir', out])
    assert rc == 0, se[-3000:]
    assert torch.load(out / 'checkpoint-1.pth', weights_only=True)['freezeout']['frozen_units'] == ['embed', 'block1']
    return out


@pytest.mark.parametrize('ckpt', ['checkpoint-0.pth', 'checkpoint-1.pth'])  # nothing frozen yet / 2 units frozen
def test_pretrain_resume_with_dont_freeze_pe_added_is_one_line(ckpt: str, pretrained: Path, demo_root: Path,
                                                               tmp_path: Path) -> None:
    path = pretrained / ckpt
    rc, so, se = cli('run_pretrain.py', [*PRE, *FREEZE, '--epochs', '3', '--data_path', demo_root, '--output_dir',
                                         tmp_path / 'out', '--resume', path, '--dont_freeze_pe'])
    assert one_error(rc, so, se) == ('error: --resume: the checkpoint schedules FreezeOut units embed, block1, block2, '
                                     'block3, block4 but this run schedules block1, block2, block3, block4; resume '
                                     'without --dont_freeze_pe, as the run was trained')


def test_pretrain_resume_with_dont_freeze_pe_dropped_is_one_line(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / 'pe'
    rc, so, se = cli('run_pretrain.py', [*PRE, *FREEZE, '--epochs', '2', '--dont_freeze_pe', '--data_path', demo_root,
                                         '--output_dir', out])
    assert rc == 0, se[-3000:]
    rc, so, se = cli('run_pretrain.py', [*PRE, *FREEZE, '--epochs', '2', '--data_path', demo_root, '--output_dir',
                                         tmp_path / 'again', '--resume', out / 'checkpoint-0.pth'])
    assert one_error(rc, so, se) == ('error: --resume: the checkpoint schedules FreezeOut units block1, block2, block3, '
                                     'block4 but this run schedules embed, block1, block2, block3, block4; resume with '
                                     '--dont_freeze_pe, as the run was trained')


def test_version_2_freezeout_state_is_checked_by_its_frozen_units() -> None:
    """Checkpoints written before ``units`` was saved: the frozen unit names tell (here: frozen with the embedding)."""
    import models_mim
    from freezeout import FreezeOut, FreezeOutSchedule
    from util.errors import UserError
    m = models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    names = FreezeOut.unit_names(m, True)
    f = FreezeOut(m, FreezeOutSchedule(names, 24, 8, 1e-3, 1e-6, 0.3, 'linear'), dont_freeze_pe=True)
    with pytest.raises(UserError, match=r'^--resume: the checkpoint has frozen FreezeOut units embed, block1 but this '
                                        r'run schedules block1, .*; resume without --dont_freeze_pe'):
        f.load_state_dict({'num_frozen': 2, 'frozen_units': ['embed', 'block1']}, None)
    f.load_state_dict({'num_frozen': 1, 'frozen_units': ['block1']}, None)  # consistent: accepted
    assert f.num_frozen == 1


def test_finetune_resume_with_dont_freeze_pe_added_is_one_line(pretrained: Path, demo_root: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / 'ft'
    args = [*FT, '--finetune', pretrained / 'checkpoint-2.pth', '--data_path', demo_root, '--output_dir', out]
    rc, so, se = cli('run_finetune.py', [*args, '--epochs', '1'])
    assert rc == 0, se[-3000:]
    rc, so, se = cli('run_finetune.py', [*args, '--epochs', '2', '--dont_freeze_pe'])  # auto-resume
    assert one_error(rc, so, se) == ('error: --resume: the checkpoint schedules FreezeOut units embed, block1, block2, '
                                     'block3, block4 but this run schedules block1, block2, block3, block4; resume '
                                     'without --dont_freeze_pe, as the run was trained')


# ---- stage weights that leave only zero-weight stages after a freeze ------------------------------------------------


def test_stage_weights_zero_after_a_freeze_is_refused_at_plan_time(demo_root: Path, tmp_path: Path) -> None:
    """Depth 4: stages 0 and 2 are fed by block index 1, so they switch off once embed, block1, block2 are frozen
    (3 units): from the third freeze step of the schedule on, --stage_weights 1,0,0,0 leaves stages 1 and 3, both at
    weight 0."""
    from freezeout import FreezeOutSchedule
    sched = FreezeOutSchedule(['embed', 'block1', 'block2', 'block3', 'block4'], 24, 8, 1.0, 0.0, 0.3, 'linear',
                              freeze_schedule='freezeout')
    step = sched.units[2].freeze_step
    out = tmp_path / 'out'
    rc, so, se = cli('run_pretrain.py', [*PRE, *FREEZE, '--epochs', '3', '--stage_weights', '1,0,0,0',
                                         '--data_path', demo_root, '--output_dir', out])
    assert one_error(rc, so, se) == (f'error: --stage_weights 1,0,0,0: at optimizer step {step} (epoch '
                                     f'{step / 8:.2f}, 3 units frozen) only stages [1, 3] are still active and '
                                     f'their weights are all 0: the loss would be exactly 0 and nothing would train; '
                                     f'give one of those stages a weight > 0, or freeze later')
    assert not out.exists() or not list(out.glob('checkpoint-*'))
    rc, so, se = cli('run_pretrain.py', [*PRE, *FREEZE, '--epochs', '3', '--stage_weights', '1,0,0,1', '--plan_only',
                                         '--data_path', demo_root, '--output_dir', out])
    assert rc == 0, se[-2000:]  # the deepest stage keeps a weight: accepted


def test_stage_weights_check_covers_curriculum_adaptive_and_dont_freeze_pe() -> None:
    import models_mim
    from freezeout import (AdaptiveBounds, AdaptiveFreezeOut, FreezeOut, FreezeOutSchedule, check_stage_weights)
    from util.errors import UserError

    def model(w, end=None):
        return models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4,
                                       num_heads=4, stage_weights=w, stage_weights_end=end)

    def scheduled(m, pe=False, t_0=0.3):
        names = FreezeOut.unit_names(m, pe)
        return FreezeOut(m, FreezeOutSchedule(names, 24, 8, 1.0, 0.0, t_0, 'linear', freeze_schedule='freezeout'), pe)
    m = model('1,0,0,0', end='1,1,0,0')  # stage 1 (block index 3) fades in: positive wherever it is the only one
    check_stage_weights(m, None, 24, 8)
    check_stage_weights(m, scheduled(m), 24, 8)
    m = model('1,0,0,0', end='0,0,1,0')  # weight moves between stages that the freeze switches off
    step = scheduled(m).schedule.units[2].freeze_step
    with pytest.raises(UserError, match=rf'^--stage_weights 1,0,0,0 --stage_weights_end 0,0,1,0: at optimizer step '
                                        rf'{step} \(epoch {step / 8:.2f}, 3 units frozen\) only stages \[1, 3\]'):
        check_stage_weights(m, scheduled(m), 24, 8)
    m = model('1,0,0,0')
    f = scheduled(m, pe=True)  # with --dont_freeze_pe, k frozen units are k frozen blocks
    step = f.schedule.units[1].freeze_step
    with pytest.raises(UserError, match=rf'at optimizer step {step} \(epoch [\d.]+, 2 units frozen\)'):
        check_stage_weights(m, f, 24, 8)
    check_stage_weights(m, scheduled(m, t_0=1.0), 24, 8)  # t_0 = 1: nothing freezes, accepted
    ada = AdaptiveFreezeOut(m, 24, 8, lambda s: 1.0, AdaptiveBounds(0.5, 2, 0.5, 2, 2))
    with pytest.raises(UserError, match=r'once the adaptive policy has frozen 3 units \(possible from step 14\)'):
        check_stage_weights(m, ada, 24, 8)
