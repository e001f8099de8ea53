"""The freeze-policy seam from outside the repository: the FreezeFirstAt plugin of the README (saved verbatim in a
temporary folder on PYTHONPATH) trains, really freezes (its units' weights stop after step 30, the frozen prefix's
stages are dropped), shows in --plan_only and --help, resumes bit-exactly, and a resume with another policy or
another --freeze_first_at is refused in one line naming both."""
import re
import sys
from pathlib import Path

import pytest
import torch

from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS

pytestmark = pytest.mark.usefixtures('single_thread')

PLUGIN = '''import freezeout

class FreezeFirstAt(freezeout.FreezePolicy):
    """Freeze the first two units at one optimizer step; every unit follows the global LR."""
    @classmethod
    def add_args(cls, group):
        group.add_argument('--freeze_first_at', type=int, default=10, help='optimizer step of the freeze')
    def __init__(self, args, units, total_steps, warmup_steps):
        super().__init__(args, units, total_steps, warmup_steps)
        self.at = args.freeze_first_at
    def frozen_units(self, step):
        return 2 if step >= self.at else 0
    def unit_lr(self, unit, step, base_lr):
        return base_lr
    def state_dict(self):
        return {'at': self.at}
    def load_state_dict(self, state):
        self.at = state['at']
'''
POLICY = ['--freeze_policy', 'my_policy:FreezeFirstAt', '--freeze_first_at', '30']


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    d = tmp_path / 'plugins'
    d.mkdir()
    (d / 'my_policy.py').write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(d))  # what PYTHONPATH=d does for a fresh interpreter
    yield d
    sys.modules.pop('my_policy', None)


def _args(demo_root, out, *extra):
    # 32 train images / batch 8 = 4 optimizer steps per epoch: step 30 lies inside epoch 7
    return [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', out, '--epochs', '10',
            '--save_freq', '1', '--vis_freq', '0', *POLICY, *extra]


def _ck(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _unit(state, prefixes):
    return {k: v for k, v in state['model'].items() if k.startswith(prefixes)}


def test_help_shows_the_plugin_flag_when_named(plugin_dir):
    rc, out, _ = cli('run_pretrain.py', ['--freeze_policy', 'my_policy:FreezeFirstAt', '--help'])
    assert rc == 0 and '--freeze_first_at' in out and 'optimizer step of the freeze' in out
    rc, out, _ = cli('run_pretrain.py', ['--help'])
    assert rc == 0 and '--freeze_first_at' not in out


def test_bad_policy_names_fail_in_one_line(plugin_dir, demo_root):
    for spec, pattern in (('nosuch', r"not a registered policy \(schedule, adaptive"),
                          ('no_module_here:X', r"cannot import module 'no_module_here'"),
                          ('my_policy:Nope', r'Nope not found'),
                          ('freezeout:FreezeOut', r'is not a subclass of freezeout.FreezePolicy')):
        rc, out, err = cli('run_pretrain.py', [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', '',
                                               '--freeze_policy', spec, '--plan_only'])
        lines = [l for l in err.splitlines() if l.strip()]
        assert rc == 2 and len(lines) == 1 and re.search(pattern, lines[0]), (spec, err)


def test_plan_only_shows_the_plugin_plan(plugin_dir, demo_root):
    rc, out, err = cli('run_pretrain.py', [*_args(demo_root, ''), '--plan_only'])
    assert rc == 0, err
    assert 'FreezeOut policy: my_policy:FreezeFirstAt (Freeze the first two units at one optimizer step' in out
    rows = {m.group(1): m.group(2) for m in re.finditer(r'^\s+\d+ (\w+)\s+(\S+)\s+\S+$', out, re.M)}
    assert rows == {'embed': '30', 'block1': '30', 'block2': 'never', 'block3': 'never', 'block4': 'never'}, out
    saving = float(re.search(r'projected saving of training FLOPs .*: ([\d.]+)%', out).group(1))
    assert 0 < saving < 100


@pytest.mark.slow
def test_trains_freezes_and_resumes_exactly(plugin_dir, demo_root, tmp_path):
    ref = tmp_path / 'ref'
    rc, out, err = cli('run_pretrain.py', _args(demo_root, ref))
    assert rc == 0, err[-3000:]
    assert "FreezeOut: step 30 (epoch 7): frozen units ['embed', 'block1']" in out
    emb_blk1 = ('patch_embed.', 'cls_token', 'blocks.0.')
    e6, e7, e9 = (_ck(ref / f'checkpoint-{e}.pth') for e in (6, 7, 9))
    # steps 28, 29 still update the two units; from step 30 on they never change again; the rest keeps training
    assert any(not torch.equal(a, b) for a, b in zip(_unit(e6, emb_blk1).values(), _unit(e7, emb_blk1).values()))
    assert all(torch.equal(a, b) for a, b in zip(_unit(e7, emb_blk1).values(), _unit(e9, emb_blk1).values()))
    assert any(not torch.equal(a, b) for a, b in zip(_unit(e7, ('blocks.3.',)).values(),
                                                     _unit(e9, ('blocks.3.',)).values()))
    assert e9['freezeout']['policy'] == 'my_policy:FreezeFirstAt' and e9['freezeout']['num_frozen'] == 2
    assert e9['freezeout']['policy_state'] == {'at': 30} and e9['freezeout']['flags']['freeze_first_at'] == 30
    # applied like any policy: the two units left the optimizer, the plan counts their skipped backward
    import json
    assert {g['unit'] for g in e9['optimizer']['param_groups']} == {2, 3, 4}
    assert {g['unit'] for g in e6['optimizer']['param_groups']} == {0, 1, 2, 3, 4}
    recs = [json.loads(l) for l in (ref / 'log.txt').read_text().splitlines()]
    assert recs[-1]['frozen_units'] == 2 and recs[-1]['freeze_policy'] == 'my_policy:FreezeFirstAt'
    assert recs[6]['planned_saving_so_far'] == 0 < recs[-1]['planned_saving_so_far'] < 1
    # resume before (epoch 5) and after (epoch 8) the freeze: the rest of the run is bit-identical
    for e in (5, 8):
        res = tmp_path / f'res{e}'
        rc, out, err = cli('run_pretrain.py', _args(demo_root, res, '--resume', ref / f'checkpoint-{e}.pth'))
        assert rc == 0, err[-3000:]
        a, b = e9, _ck(res / 'checkpoint-last.pth')
        assert a['model'].keys() == b['model'].keys()
        assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model']), e
        assert a['freezeout'] == b['freezeout'] and a['step'] == b['step'] == 40
    # another policy, or another value of the policy's own flag: refused in one line naming both
    for extra, pattern in ((['--freeze_first_at', '20'],
                            r'shaped by --freeze_first_at 30, this run asks for --freeze_first_at 20'),):
        rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'bad', '--resume', ref / 'checkpoint-8.pth',
                                                    *extra))
        lines = [l for l in err.splitlines() if l.strip()]
        assert rc == 2 and len(lines) == 1 and re.search(pattern, lines[0]), err
    argv = [a for a in _args(demo_root, tmp_path / 'bad2', '--resume', ref / 'checkpoint-8.pth')
            if a not in POLICY] + ['--t_0', '0.5']
    rc, out, err = cli('run_pretrain.py', argv)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and re.search(
        r'written with --freeze_policy my_policy:FreezeFirstAt, this run asks for --freeze_policy schedule',
        lines[0]), err


def test_frozen_units_going_down_is_an_error():
    import freezeout

    class Flaky(freezeout.FreezePolicy):
        def frozen_units(self, step):
            return 1 if step == 3 else 0

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def units(self):
            from types import SimpleNamespace as U
            return [U(name='a', params=dict(self.a.named_parameters())),
                    U(name='b', params=dict(self.b.named_parameters()))]

        def set_frozen(self, n, embed_frozen):
            pass
    m = Model()
    fo = freezeout.FreezeOut(m, Flaky(None, ['a', 'b'], 10, 0), base_lr=lambda s: 1e-3)
    opt = torch.optim.AdamW(fo.param_groups(0.0))
    for s in range(3):
        assert not fo.step(opt, s)
    assert fo.step(opt, 3) and not m.a.weight.requires_grad
    with pytest.raises(RuntimeError, match=r'frozen_units\(4\) = 0, but 1 units are frozen already'):
        fo.step(opt, 4)
