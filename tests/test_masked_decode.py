"""The masked-only decoder path (the training path of LocalMIM.forward) equals the full-computation path: loss,
per-stage losses and every gradient, for every stage scale (8, 4, 2, 1, 0.5), with and without FreezeOut-frozen
units; and its two building blocks (block_rows, head_per_token) equal the timm block / conv head they replace."""
import pytest
import torch

from models_mim import block_rows, create_model, head_per_token, scale_head

pytestmark = pytest.mark.usefixtures('single_thread')

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
# float32 reassociation only (row-subset GEMMs, GEMM instead of conv): observed <= 1e-7 on losses of ~1 and ~1e-6
# relative on gradients; the bounds leave a margin of ~10x
LOSS_TOL = dict(rtol=1e-6, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-7)


def _freeze(model, num_blocks):
    """What freezeout.FreezeOut does to the model at a freeze event (embedding + first blocks)."""
    for u in model.units()[:num_blocks + 1]:
        for p in u.params.values():
            p.requires_grad_(False)
    model.set_frozen(num_blocks, True)


def _loss_and_grads(model, imgs, full, stage=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    out = model(imgs, mask_ratio=0.75, full_decode=full)
    (out['loss'] if stage is None else out['stage_losses'][stage]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize('frozen', [0, 2])
@pytest.mark.parametrize('cfg', [dict(), dict(patch_size=8, all_stages=True)], ids=['taps-4-2-1-0.5', 'all-8-4-4-2'])
def test_masked_path_equals_full_path_per_stage(cfg, frozen):
    torch.manual_seed(0)
    model = create_model('MIM_vit_tiny_patch16', **{**TINY, **cfg}, stage_weights='4321')
    model.train()
    if frozen:
        _freeze(model, frozen)
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    active = model.active_stages()
    assert active and (len(active) < len(model.stage_scales)) == bool(frozen)
    for stage in [None] + active:  # the total, then each stage alone: every scale's gradients are checked
        full, g_full = _loss_and_grads(model, imgs, True, stage)
        part, g_part = _loss_and_grads(model, imgs, False, stage)
        torch.testing.assert_close(part['loss'], full['loss'], **LOSS_TOL)
        assert set(part['stage_losses']) == set(full['stage_losses']) == set(active)
        for k in active:
            torch.testing.assert_close(part['stage_losses'][k], full['stage_losses'][k], **LOSS_TOL)
        assert set(g_part) == set(g_full) and g_full, stage
        for n in g_full:
            torch.testing.assert_close(g_part[n], g_full[n], **GRAD_TOL, msg=lambda m: f'{n} (stage {stage}): {m}')
        if frozen:
            assert not any(n.startswith(('blocks.0.', 'blocks.1.', 'patch_embed')) for n in g_part)
    # the masked path really is in use: scale >= 1 stages predict the M masked tokens' cells only
    g = model.grid
    n_masked = g * g - int(g * g * 0.25)
    torch.manual_seed(7)
    latents, mask, ids_restore = model.forward_encoder(imgs, 0.75)
    with torch.no_grad():
        _, preds = model.decode(latents, mask, ids_restore, model.hog(imgs, active), 0.75)
    for k in active:
        s = model.stage_scales[k]
        want = (3, n_masked, int(s) ** 2, 27) if s >= 1 else (3, int(g * s) ** 2, 27)
        assert tuple(preds[k].shape) == want, (k, s)


def test_visualisation_still_gets_every_cell():
    torch.manual_seed(0)
    model = create_model('MIM_vit_tiny_patch16', **TINY)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(3)
        vis = model(imgs, return_vis=True)
        torch.manual_seed(3)
        train = model(imgs)
    for k, s in enumerate(model.stage_scales):
        assert vis['pred'][k].shape == (2, int(8 * s) ** 2, 27) == vis['target'][k].shape
    torch.testing.assert_close(train['loss'], vis['loss'], **LOSS_TOL)
    assert set(train) == {'loss', 'stage_losses'}


@pytest.mark.parametrize('fused', [True, False])
def test_block_rows_equals_block_output_rows(fused):
    torch.manual_seed(0)
    blk = create_model('MIM_vit_tiny_patch16', **TINY).decoder[0].blocks[0]
    blk.attn.fused_attn = fused
    x = torch.randn(2, 65, 256)
    rows = torch.stack([torch.randperm(65)[:20] for _ in range(2)])
    ref = torch.gather(blk(x), 1, rows[..., None].expand(-1, -1, 256))
    torch.testing.assert_close(block_rows(blk, x, rows), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('scale', [1, 2, 4, 8])
def test_head_per_token_equals_conv_head(scale):
    torch.manual_seed(scale)
    head = scale_head(32, 27, scale)
    for mod in head.modules():  # non-trivial LayerNorm2d affine parameters
        if hasattr(mod, 'weight') and mod.weight is not None and mod.weight.dim() == 1:
            torch.nn.init.normal_(mod.weight, 1.0, 0.3)
            torch.nn.init.normal_(mod.bias, 0.0, 0.3)
    g = 3
    x = torch.randn(2, 32, g, g)
    full = head(x)  # [2, 27, g·s, g·s]
    per_tok = head_per_token(head, x.flatten(2).transpose(1, 2).reshape(-1, 32), scale)  # [2·g², s², 27]
    ref = full.view(2, 27, g, scale, g, scale).permute(0, 2, 4, 3, 5, 1).reshape(2 * g * g, scale * scale, 27)
    torch.testing.assert_close(per_tok, ref, rtol=1e-5, atol=1e-6)
