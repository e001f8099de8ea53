"""Evaluation models: checkpoint → timm ViT mapping, pos-embed resampling, errors, export, layer decay (tiny, CPU)."""
import json
import re

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import checkpoint_formats
import models_mim
import models_vit
from util.errors import UserError
from tools.export import export_encoder

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
MIM_ARGS = dict(model='MIM_vit_tiny_patch16', input_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)


pytestmark = pytest.mark.usefixtures('single_thread')  # tiny tensors on 2 shared cores (tests/conftest.py)


def _mim(all_stages: bool = False) -> models_mim.LocalMIM:
    torch.manual_seed(0)
    m = models_mim.create_model('MIM_vit_tiny_patch16', all_stages=all_stages, **TINY)
    with torch.no_grad():  # distinct stage norms, so a wrong mapping cannot go unnoticed
        for k, norm in enumerate(m.norm):
            norm.weight.fill_(1.0 + k)
            norm.bias.fill_(0.1 * k)
    return m.eval()


def _save(tmp_path, mim, name='pre.pth', **extra):
    path = tmp_path / name
    torch.save(dict(model=mim.state_dict(), epoch=3, args=dict(MIM_ARGS, **extra)), path)
    return str(path)


def _vit(global_pool='avg', img_size=32, num_classes=5, **kw):
    return models_vit.create_model('vit_tiny_patch16', **dict(TINY, img_size=img_size, **kw),
                                   num_classes=num_classes, global_pool=global_pool)


@pytest.mark.parametrize('all_stages', [False, True])
def test_last_stage_norm_is_final_norm_for_cls_token(tmp_path, all_stages):
    mim = _mim(all_stages)
    last = len(mim.norm) - 1
    assert last == (TINY['depth'] - 1 if all_stages else 3)
    model = _vit('token')
    report, _ = checkpoint_formats.load_pretrained(model, _save(tmp_path, mim), verbose=False)
    assert sorted(report.missing) == ['head.bias', 'head.weight']
    assert torch.equal(model.norm.weight, mim.norm[last].weight)
    assert torch.equal(model.norm.bias, mim.norm[last].bias)
    assert not any(k.startswith('decoder') for k in report.loaded)
    # the mapped encoder computes what the pre-training encoder computed (unmasked): cls token after norm.{S-1}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        latents, _, _ = mim.forward_encoder(x, 0.0)
        ours = models_vit.encoder_features(model.eval(), x, 'token')
        ours_avg = models_vit.encoder_features(model, x, 'avg')
    ref = latents[last]
    torch.testing.assert_close(ours, ref[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_avg, ref[:, 1:].mean(1), rtol=1e-4, atol=1e-5)  # order-free: masking shuffles


def test_global_pool_keeps_fc_norm_fresh(tmp_path):
    model = _vit('avg')
    report, _ = checkpoint_formats.load_pretrained(model, _save(tmp_path, _mim()), verbose=False)
    assert sorted(report.missing) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert torch.equal(model.fc_norm.weight, torch.ones(64)) and torch.equal(model.fc_norm.bias, torch.zeros(64))
    assert isinstance(model.norm, torch.nn.Identity)
    assert model.head.weight.std() < 1e-4  # MAE fine-tune head init, trunc-normal std 2e-5


def test_raw_and_ddp_prefixed_state_dicts(tmp_path):
    mim = _mim()
    path = tmp_path / 'raw.pth'
    torch.save({f'module.{k}': v for k, v in mim.state_dict().items()}, path)
    model = _vit('token')
    checkpoint_formats.load_pretrained(model, str(path), verbose=False)
    assert torch.equal(model.blocks[2].mlp.fc1.weight, mim.blocks[2].mlp.fc1.weight)
    assert torch.equal(model.norm.weight, mim.norm[3].weight)


def _mae_interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int, extra_tokens: int = 1) -> torch.Tensor:
    """MAE's interpolate_pos_embed written out: keep the extra (cls) rows, bicubic-resize the square patch grid
    with align_corners=False and no antialiasing, flatten row-major."""
    extra, grid_tokens = pos_embed[:, :extra_tokens], pos_embed[:, extra_tokens:]
    old, dim = int(round(grid_tokens.shape[1] ** 0.5)), grid_tokens.shape[2]
    grid_tokens = grid_tokens.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid_tokens = torch.nn.functional.interpolate(grid_tokens, size=(new_grid, new_grid), mode='bicubic',
                                                  align_corners=False)
    return torch.cat([extra, grid_tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize('img_size,grid', [(48, 12), (24, 6)])  # 8x8 grid up to 12x12 and down to 6x6
def test_pos_embed_resampled_as_mae(tmp_path, img_size, grid):
    mim = _mim()
    with torch.no_grad():  # a learned-looking table: the fixed sin-cos one is too smooth to tell kernels apart
        mim.pos_embed.copy_(torch.randn_like(mim.pos_embed))
    model = _vit('avg', img_size=img_size)
    report, _ = checkpoint_formats.load_pretrained(model, _save(tmp_path, mim), verbose=False)
    assert any(f'8x8 to a {grid}x{grid}' in n for n in report.notes)
    assert model.pos_embed.shape == (1, 1 + grid * grid, 64)
    mae = _mae_interpolate_pos_embed(mim.pos_embed.detach(), grid)
    assert (model.pos_embed.detach() - mae).abs().max().item() <= 1e-6
    # timm's default (antialias=True) is another kernel: the comparison above can tell them apart
    timm_default = resample_abs_pos_embed(mim.pos_embed.detach(), new_size=[grid, grid], old_size=[8, 8],
                                          num_prefix_tokens=1)
    assert (timm_default - mae).abs().max().item() > 1e-3
    assert torch.equal(model.pos_embed[0, 0], mim.pos_embed[0, 0])  # cls row untouched
    assert model(torch.randn(1, 3, img_size, img_size)).shape == (1, 5)


def _shapes_only(width: int, depth: int, patch: int = 16, grid: int = 2) -> dict:
    """A state dict with the shapes that reveal an architecture, and nothing that records the head count."""
    sd = {'patch_embed.proj.weight': torch.zeros(width, 3, patch, patch), 'cls_token': torch.zeros(1, 1, width),
          'pos_embed': torch.zeros(1, 1 + grid * grid, width)}
    sd.update({f'blocks.{i}.norm1.weight': torch.zeros(width) for i in range(depth)})
    return {'model': sd}


@pytest.mark.parametrize('width,heads,model', [(192, 3, 'vit_tiny_patch16'), (384, 6, 'vit_small_patch16'),
                                               (768, 12, 'vit_base_patch16'), (1024, 16, 'vit_large_patch16')])
def test_heads_without_args_come_from_the_width_preset(width, heads, model):
    """No args, depth 2: never ViT-L's 16 heads by default, but the standard ViT of that width."""
    found = checkpoint_formats.checkpoint_arch(_shapes_only(width, 2))
    assert found['num_heads'] == (heads, f'width {width} = {model}')
    values, sources = checkpoint_formats.resolve_arch(found, {}, dict(input_size=224), '--finetune x.pth',
                                                      'vit_large_patch16')
    assert (values['num_heads'], values['embed_dim'], values['depth'], values['model']) == (heads, width, 2, model)
    assert (values['input_size'], sources['input_size']) == (32, 'tensor shapes')  # 2x2 grid of 16 px patches


def test_heads_of_a_non_standard_width_are_asked_for():
    found = checkpoint_formats.checkpoint_arch(_shapes_only(100, 2, patch=4))
    assert 'num_heads' not in found and 'model' not in found
    with pytest.raises(UserError, match=r'^--finetune x\.pth: the number of attention heads is not recorded and width '
                                        r'100 is no standard ViT.*; pass --num_heads$'):
        checkpoint_formats.resolve_arch(found, {}, {}, '--finetune x.pth', 'vit_large_patch16')
    values, sources = checkpoint_formats.resolve_arch(found, {'num_heads': 5}, {}, '--finetune x.pth',
                                                      'vit_large_patch16')
    assert (values['num_heads'], sources['num_heads'], values['embed_dim']) == (5, 'typed', 100)


@pytest.mark.parametrize('kw,what', [(dict(depth=6), 'depth=6'), (dict(embed_dim=32, num_heads=4), 'embed_dim=32'),
                                     (dict(num_heads=8), 'num_heads=8'), (dict(patch_size=8), 'patch_size=8')])
def test_wrong_architecture_is_a_user_error(tmp_path, kw, what):
    path = _save(tmp_path, _mim())
    with pytest.raises(UserError, match=r'architecture does not match') as e:
        checkpoint_formats.load_pretrained(_vit(**kw), path, verbose=False)
    assert what in str(e.value) and '--finetune' in str(e.value)


def test_non_checkpoint_files_are_user_errors(tmp_path):
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    with pytest.raises(UserError, match='not a PyTorch checkpoint'):
        checkpoint_formats.load_pretrained(_vit(), str(text))
    other = tmp_path / 'other.pth'
    torch.save({'optimizer': {'lr': 1.0}, 'epoch': 1}, other)
    with pytest.raises(UserError, match='no model weights'):
        checkpoint_formats.load_pretrained(_vit(), str(other))
    with pytest.raises(UserError, match='file not found'):
        checkpoint_formats.load_pretrained(_vit(), str(tmp_path / 'missing.pth'))
    with pytest.raises(UserError, match='not an evaluation model'):
        models_vit.create_model('resnet50')


def test_encoder_from_mim_state_and_model_agree():
    mim = _mim()
    x = torch.randn(2, 3, 32, 32)
    a = checkpoint_formats.encoder_from_mim_state(mim.state_dict(), MIM_ARGS).eval()
    b = checkpoint_formats.encoder_from_mim_model(mim).eval()
    with torch.no_grad():
        torch.testing.assert_close(models_vit.encoder_features(a, x), models_vit.encoder_features(b, x))
    assert a.num_classes == 0 and a.cls_token.data_ptr() != mim.cls_token.data_ptr()


@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_export_loads_in_timm_with_same_features(tmp_path, pool):
    mim = _mim()
    out = tmp_path / f'enc_{pool}.pth'
    name, kwargs = export_encoder(_save(tmp_path, mim), str(out), pool=pool)
    spec = json.loads((tmp_path / f'enc_{pool}.pth.json').read_text())
    assert spec == {'timm_model': name, 'kwargs': kwargs} and name in timm.list_models()
    model = timm.create_model(spec['timm_model'], pretrained=False, checkpoint_path=str(out), **spec['kwargs']).eval()
    ours = checkpoint_formats.encoder_from_mim_state(mim.state_dict(), MIM_ARGS).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), models_vit.encoder_features(ours, x, pool))


def test_export_fine_tuned_keeps_head_and_pool(tmp_path):
    model = _vit('avg', num_classes=7)
    checkpoint_formats.load_pretrained(model, _save(tmp_path, _mim()), verbose=False)
    path = tmp_path / 'ft.pth'
    torch.save(dict(model=model.state_dict(), epoch=0, args=dict(model='vit_tiny_patch16', **{
        k: v for k, v in MIM_ARGS.items() if k != 'model'})), path)
    name, kwargs = export_encoder(str(path), str(tmp_path / 'ft_export.pth'))
    assert kwargs['num_classes'] == 7 and kwargs['global_pool'] == 'avg'
    timm_model = timm.create_model(name, checkpoint_path=str(tmp_path / 'ft_export.pth'), **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), model.eval()(x))


@pytest.mark.parametrize('global_pool', ['avg', 'token'])
def test_layer_decay_groups_follow_mae_rule(global_pool):
    model = _vit(global_pool)
    decay, depth = 0.75, TINY['depth']
    groups = models_vit.layer_decay_param_groups(model, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g['params']:
            n = names[id(p)]
            seen.add(n)
            if n in ('cls_token', 'pos_embed') or n.startswith('patch_embed'):
                layer_id = 0
            elif n.startswith('blocks.'):
                layer_id = int(re.match(r'blocks\.(\d+)\.', n).group(1)) + 1
            else:
                layer_id = depth + 1  # norm, fc_norm, head
            assert g['lr_scale'] == pytest.approx(decay ** (depth + 1 - layer_id)), n
            no_wd = p.ndim <= 1 or n in ('cls_token', 'pos_embed')
            assert g['weight_decay'] == (0.0 if no_wd else 0.05), n
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}


def test_default_randaugment_survives_zero_bit_posterize():
    """'rand-m9-mstd0.5-inc1' reaches magnitude 10 = keep 0 bits, which Pillow >= 11 rejects; ours gives black."""
    import argparse

    import numpy as np
    from PIL import Image

    from util.datasets import finetune_transform
    args = argparse.Namespace(input_size=32, color_jitter=None, aa='rand-m9-mstd0.5-inc1', reprob=0.25,
                              remode='pixel', recount=1)
    tf = finetune_transform(True, args)  # the shipped transform must already be safe
    ops = [op for t in tf.transforms for op in getattr(t, 'ops', []) if op.name == 'PosterizeIncreasing']
    assert len(ops) == 1
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.asarray(ops[0].aug_fn(img, 0)).max() == 0
    assert np.asarray(ops[0].aug_fn(img, 2)).max() == 192
