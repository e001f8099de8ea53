"""FreezeOut in fine-tuning: the timm ViT's units (models_vit.ViTUnits), layer decay x the unit schedule, freezing for
real (frozen parameters unchanged, no grads, out of the optimizer, eval mode, no_grad prefix), the FLOP plan, and
through run_finetune.py: --t_0 1 bit-identical to plain fine-tuning, adaptive policy and exact resume."""
import math

import pytest
import torch

import models_vit
from freezeout import FreezeOut, FreezeOutSchedule, measure_unit_flops, projected_saving, tag_param_groups

pytestmark = pytest.mark.usefixtures('single_thread')


def tiny_vit(seed=0, drop_path=0.0, global_pool='avg'):
    torch.manual_seed(seed)
    return models_vit.create_model('vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                   num_classes=5, global_pool=global_pool, drop_path_rate=drop_path)


def test_vit_units_cover_encoder_head_never():
    model = tiny_vit()
    keys = list(model.state_dict())
    seam = models_vit.ViTUnits(model)
    assert list(model.state_dict()) == keys  # the FreezableBlocks swap keeps every state-dict key
    units = seam.units()
    assert [u.name for u in units] == ['embed', 'block1', 'block2', 'block3', 'block4']
    assert set(units[0].params) == {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}
    assert all(n.startswith(f'blocks.{k}.') for k, u in enumerate(units[1:]) for n in u.params)
    in_units = {n for u in units for n in u.params}
    rest = {n for n, _ in model.named_parameters()} - in_units
    assert rest == {'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias'}


def _setup(t_0, how='linear', drop_path=0.1, layer_decay=0.75, total=12, warm=2, dont_freeze_pe=False):
    model = tiny_vit(drop_path=drop_path)
    seam = models_vit.ViTUnits(model)
    groups = models_vit.layer_decay_param_groups(model, 0.05, layer_decay)
    names = [u.name for u in (seam.units()[1:] if dont_freeze_pe else seam.units())]
    sched = FreezeOutSchedule(names, total, warm, 1e-3, 1e-6, t_0=t_0, how_scale=how, freeze_schedule='freezeout')
    fo = FreezeOut(seam, sched, dont_freeze_pe)
    tagged = tag_param_groups(groups, seam.units(), dont_freeze_pe)
    opt = torch.optim.AdamW(tagged, lr=1e-3)
    return model, seam, sched, fo, opt


def test_freezes_for_real_with_layer_decay():
    model, seam, sched, fo, opt = _setup(0.3)
    # linear t_0 = 0.3 over 5 units, T = 12: embed freezes at ceil(0.3·12) = 4, block1 at ceil(0.475·12) = 6
    assert [u.freeze_step for u in sched.units] == [4, 6, 8, 10, None]
    depth = 4
    names = {id(p): n for n, p in model.named_parameters()}
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    before = {}
    for j in range(7):
        changed = fo.step(opt, j)
        assert changed == (j in (4, 6))
        for g in opt.param_groups:
            scale = 0.75 ** (depth + 1 - models_vit.mae_layer_id(names[id(g['params'][0])], depth + 1))
            assert g['lr_scale'] == pytest.approx(scale)
            unit_lr = sched.global_lr_at(j) if g['unit'] < 0 else sched.lr_at(g['unit'], j)
            assert g['lr'] == unit_lr * scale  # the unit schedule multiplies the layer-decay scale
        if j in (4, 6):  # weights at each freeze
            before[j] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if j == 4:
            assert model.blocks.num_frozen == 0 and model.blocks.embed_frozen
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # after step 6: embed and block1 frozen
    assert fo.num_frozen == 2 and model.blocks.num_frozen == 1
    frozen = {n for u in fo.sched_units[:2] for n in u.params}
    in_opt = {id(p) for g in opt.param_groups for p in g['params']}
    for n, p in model.named_parameters():
        if n in frozen:
            at = 4 if n in fo.sched_units[0].params else 6
            assert torch.equal(p, before[at][n]), n  # unchanged since its freeze (no decay, no moments)
            assert not p.requires_grad and p.grad is None and id(p) not in in_opt and p not in opt.state
        else:
            assert p.requires_grad and id(p) in in_opt
    assert not torch.equal(model.blocks[2].mlp.fc1.weight, before[6]['blocks.2.mlp.fc1.weight'])
    # frozen block in eval mode (drop path off) through model.train(); the others train
    model.train()
    assert not model.blocks[0].training and model.blocks[1].training and model.training
    # the prefix runs under no_grad: its output carries no graph
    seen = {}
    h = model.blocks[0].register_forward_hook(lambda m, i, o: seen.update(out=o))
    model(x).sum().backward()
    h.remove()
    assert not seen['out'].requires_grad


def test_t0_1_is_plain_schedule_bit_for_bit():
    from util.lr_sched import WarmupCosine
    model, seam, sched, fo, opt = _setup(1.0)
    plain = WarmupCosine(1e-3, 1e-6, 2, 12)
    ref = torch.optim.AdamW(models_vit.layer_decay_param_groups(tiny_vit(), 0.05, 0.75), lr=1e-3)
    for j in range(12):
        assert fo.step(opt, j) is False
        plain.apply(ref, j)
        by_scale = {g['lr_scale']: g['lr'] for g in ref.param_groups}
        assert all(g['lr'] == by_scale[g['lr_scale']] for g in opt.param_groups)


def test_dont_freeze_pe_keeps_embedding_training():
    model, seam, sched, fo, opt = _setup(0.3, dont_freeze_pe=True)
    assert [u.name for u in fo.sched_units] == ['block1', 'block2', 'block3', 'block4']
    for j in range(5):  # block1 freezes at ceil(0.3 · 12) = 4
        fo.step(opt, j)
    assert fo.num_frozen == 1 and model.blocks.num_frozen == 1 and not model.blocks.embed_frozen
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    assert model.patch_embed.proj.weight.grad is not None  # the input-side backward runs through frozen block1
    assert model.blocks[0].mlp.fc1.weight.grad is None


def test_flop_plan_for_the_vit():
    model = tiny_vit()
    seam = models_vit.ViTUnits(model)
    flops = measure_unit_flops(model, 32, 0.0, torch.device('cpu'), forward=model, units=seam.units(),
                               time_targets=False)
    f = flops['unit_fwd']
    assert len(f) == 5 and f[0] > 0 and all(b == pytest.approx(f[1], rel=1e-6) for b in f[1:])  # equal blocks
    # analytic block forward: qkv 3D², proj D², mlp 8D² per token (x2 FLOPs per MAC) + attention 4·N²·D
    n, d = 65, 64
    assert f[1] == pytest.approx(2 * n * 12 * d * d + 4 * n * n * d, rel=0.02)
    sched = FreezeOutSchedule([u.name for u in seam.units()], 100, 10, 1e-3, 1e-6, t_0=0.8, how_scale='cubic')
    s = projected_saving(sched, flops, False)
    assert 0.05 < s < 0.3


# ---- through run_finetune.py (in-process: the same main() the command line runs) ---------------------------------

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import models_mim  # noqa: E402

# 32 train images, batch 8: 4 steps/epoch; 3 epochs: T = 12, W = 4. Linear t_0 = 0.3 over 5 units freezes (FreezeOut-
# paper schedule, pinned) the embedding at step 4 (start of epoch 1), block1 at 6, block2 at 8 (start of epoch 2),
# block3 at 10; block4 never.
FT = ['--freeze_schedule', 'freezeout', '--input_size', '32', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu', '--seed', '3',
      '--lr', '1e-2', '--warmup_epochs', '1', '--save_freq', '1', '--layer_decay', '0.75', '--drop_path', '0.1']


@pytest.fixture(scope='module')
def pretrain_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    mim = models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4,
                                  num_heads=4)
    path = tmp_path_factory.mktemp('pre') / 'checkpoint-0.pth'
    torch.save({'model': mim.state_dict(), 'epoch': 0,
                'args': dict(model='MIM_vit_tiny_patch16', input_size=32, patch_size=4, embed_dim=64, depth=4,
                             num_heads=4)}, path)
    return str(path)


def finetune(*argv):
    import run_finetune
    args = argparse.ArgumentParser(parents=[run_finetune.get_args_parser()]).parse_args(list(map(str, argv)))
    args.argv = list(map(str, argv))
    run_finetune.main(args)


def ckpt(d, name='checkpoint-last.pth'):
    return torch.load(d / name, map_location='cpu', weights_only=True)


def losses(d):
    return [{k: v for k, v in json.loads(l).items() if k.startswith(('train_loss', 'train_lr', 'test_', 'epoch'))
             and k != 'train_epoch_time'} for l in (d / 'log.txt').read_text().splitlines()]


def test_cli_t0_1_is_bit_identical_to_plain_finetuning(pretrain_ckpt, demo_root, tmp_path, capsys):
    common = [*FT, '--epochs', '2', '--finetune', pretrain_ckpt, '--data_path', demo_root, '--mixup', '0.8',
              '--cutmix', '1.0']
    finetune(*common, '--output_dir', tmp_path / 'plain')
    finetune(*common, '--output_dir', tmp_path / 't1', '--t_0', '1')
    out = capsys.readouterr().out
    assert 'FreezeOut plan: cubic t_0=1' in out and 'projected saving of training FLOPs' in out
    a, b = ckpt(tmp_path / 'plain'), ckpt(tmp_path / 't1')
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert b['freezeout']['num_frozen'] == 0
    assert losses(tmp_path / 'plain') == losses(tmp_path / 't1')


def test_cli_finetune_freezes_for_real_and_resumes_exactly(pretrain_ckpt, demo_root, tmp_path, capsys):
    ref, res = tmp_path / 'ref', tmp_path / 'res'
    common = [*FT, '--epochs', '3', '--finetune', pretrain_ckpt, '--data_path', demo_root, '--how_scale', 'linear',
              '--t_0', '0.3', '--mixup', '0.8', '--cutmix', '1.0']
    finetune(*common, '--output_dir', ref)
    out = capsys.readouterr().out
    assert [ln.split(': frozen units ')[0] for ln in out.splitlines() if ln.startswith('FreezeOut: step')] == [
        'FreezeOut: step 4 (epoch 1)', 'FreezeOut: step 6 (epoch 1)', 'FreezeOut: step 8 (epoch 2)',
        'FreezeOut: step 10 (epoch 2)']
    recs = [json.loads(l) for l in (ref / 'log.txt').read_text().splitlines()]
    assert [r['frozen_units'] for r in recs] == [0, 2, 4]
    saving = [r['planned_saving_so_far'] for r in recs]
    assert saving[0] == 0 < saving[1] < saving[2] < 1
    c0, c1, last = ckpt(ref, 'checkpoint-0.pth'), ckpt(ref, 'checkpoint-1.pth'), ckpt(ref)
    emb = ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias']
    assert all(torch.equal(c0['model'][k], last['model'][k]) for k in emb)  # frozen from step 4 on
    b2 = [k for k in last['model'] if k.startswith('blocks.1.')]
    assert all(torch.equal(c1['model'][k], last['model'][k]) for k in b2)  # block2 frozen from step 8 on
    assert not torch.equal(c1['model']['blocks.3.mlp.fc1.weight'], last['model']['blocks.3.mlp.fc1.weight'])
    assert not torch.equal(c1['model']['head.weight'], last['model']['head.weight'])
    # out of the optimizer: state only for block4, fc_norm, head (2 + 2 + ... tensors), groups of those only
    n_train = sum(1 for k in last['model'] if k.startswith(('blocks.3.', 'fc_norm.', 'head.')))
    assert len(last['optimizer']['state']) == n_train
    assert {g['name'] for g in last['optimizer']['param_groups']} == {'block4', 'rest'}
    # every layer-decay scale survives the split (block4: 0.75^1, fc_norm/head: 1)
    assert {round(g['lr_scale'], 6) for g in last['optimizer']['param_groups']} == {0.75, 1.0}
    # resume from the epoch-1 checkpoint (embed and block1 frozen): the rest is bit-identical
    res.mkdir()
    shutil.copy(ref / 'checkpoint-1.pth', res / 'checkpoint-last.pth')
    (res / 'log.txt').write_text(''.join((ref / 'log.txt').read_text().splitlines(keepends=True)[:2]))
    finetune(*common, '--output_dir', res)
    again = ckpt(res)
    for k in last['model']:
        assert torch.equal(last['model'][k], again['model'][k]), k
    assert last['freezeout'] == again['freezeout'] and losses(ref) == losses(res)
    sa, sb = last['optimizer']['state'], again['optimizer']['state']
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


@pytest.mark.parametrize('signal', ['weight', 'output'])
def test_cli_finetune_adaptive_decides_and_freezes(signal, pretrain_ckpt, demo_root, tmp_path, capsys):
    out_dir = tmp_path / 'o'
    finetune(*FT, '--epochs', '3', '--finetune', pretrain_ckpt, '--data_path', demo_root, '--output_dir', out_dir,
             '--log_dir', tmp_path / 'tb', '--freeze_policy', 'adaptive', '--freeze_signal', signal, '--freeze_window', '2', '--freeze_tail', '1', '--freeze_threshold', '1',
             '--freeze_patience', '1', '--freeze_earliest', '0')
    out = capsys.readouterr().out
    recs = [json.loads(l) for l in (out_dir / 'log.txt').read_text().splitlines()]
    decisions = [d for r in recs for d in r['freeze_decisions']]
    assert decisions and [d['unit'] for d in decisions] == ['embed', 'block1', 'block2', 'block3'][:len(decisions)]
    assert out.count('FreezeOut adaptive: step') == len(decisions)
    assert recs[-1]['frozen_units'] >= 1 and recs[-1]['decided_saving_so_far'] > 0
    assert ckpt(out_dir)['freezeout']['policy'] == 'adaptive' and ckpt(out_dir)['freezeout']['policy_state']['signal'] == signal
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tmp_path / 'tb')).Reload()
    assert [e.value for e in ea.Scalars('freezeout/decided_unit')] == [d['index'] for d in decisions]
    assert ea.Scalars('freezeout/frozen_units')[-1].value == recs[-1]['frozen_units']


def test_cli_finetune_adaptive_plan_only(pretrain_ckpt, demo_root, tmp_path, capsys):
    finetune(*FT, '--epochs', '3', '--finetune', pretrain_ckpt, '--data_path', demo_root, '--output_dir',
             tmp_path / 'o', '--freeze_policy', 'adaptive', '--freeze_window', '2', '--plan_only')
    out = capsys.readouterr().out
    assert 'FreezeOut policy: adaptive, signal=coherence' in out and 'window: every 2 steps' in out
    assert 'order: prefix (embed, block1, block2, block3); block4 never freezes' in out
    assert not (tmp_path / 'o' / 'log.txt').exists()
