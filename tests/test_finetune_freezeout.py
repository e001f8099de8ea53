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
    sched = FreezeOutSchedule(names, total, warm, 1e-3, 1e-6, t_0=t_0, how_scale=how)
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
