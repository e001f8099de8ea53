"""Fine-tuning FreezeOut on a timm ViT (models_vit.ViTUnits): the frozen prefix runs without grad however timm calls
the blocks: its plain ``self.blocks(x)``, its own loop for an attention mask, and grad checkpointing's
``checkpoint_seq``; the trainable suffix gets the same gradients in every mode."""
from __future__ import annotations

from typing import Dict, List

import pytest
import torch

import models_vit

pytestmark = pytest.mark.usefixtures('single_thread')

DEPTH = 4


def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return models_vit.create_model('vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=DEPTH,
                                   num_heads=4, num_classes=3)


def freeze(model, blocks: int, embed: bool) -> None:
    """What freezeout.FreezeOut.apply_frozen does to a ViT: requires_grad off for the frozen units, then the seam."""
    seam = models_vit.ViTUnits(model)
    units = seam.units()
    for u in (units[:blocks + 1] if embed else units[1:blocks + 1]):
        for p in u.params.values():
            p.requires_grad_(False)
    seam.set_frozen(blocks, embed_frozen=embed)


def observe(model) -> Dict[int, List[bool]]:
    """Grad mode seen inside each block (a hook on its attention, i.e. within the block's own forward)."""
    seen: Dict[int, List[bool]] = {b: [] for b in range(DEPTH)}
    for b, blk in enumerate(model.blocks):
        blk.attn.register_forward_hook(lambda m, i, o, b=b: seen[b].append(torch.is_grad_enabled()))
    return seen


def forward(model, x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == 'checkpointing':
        model.set_grad_checkpointing(True)
        return model(x)
    if mode == 'attn_mask':  # an all-visible mask: the same function, through timm's per-block loop
        n = model.patch_embed.num_patches + model.num_prefix_tokens
        feats = model.forward_features(x, attn_mask=torch.zeros(1, 1, n, n, dtype=torch.bool).logical_not())
        return model.forward_head(feats)
    return model(x)


MODES = ['plain', 'checkpointing', 'attn_mask']


def grads(mode: str, blocks: int, embed: bool):
    model = vit().train()
    freeze(model, blocks, embed)
    seen = observe(model)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    out = forward(model, x, mode)
    out.square().mean().backward()
    assert torch.is_grad_enabled()  # restored after the frozen prefix
    return seen, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out.detach()


@pytest.mark.parametrize('mode', MODES)
def test_frozen_prefix_runs_without_grad_in_every_timm_path(mode: str) -> None:
    seen, g, out = grads(mode, 2, embed=True)
    assert all(seen[b] and not any(seen[b]) for b in (0, 1)), seen  # frozen: every call under no_grad
    assert all(seen[b] and all(seen[b]) for b in (2, 3)), seen     # trainable: with grad
    assert not any(n.startswith(('blocks.0.', 'blocks.1.', 'patch_embed.', 'cls_token', 'pos_embed')) for n in g)
    ref_seen, ref_g, ref_out = grads('plain', 2, embed=True)
    assert set(g) == set(ref_g) and any(n.startswith('blocks.2.') for n in g)
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('mode', MODES)
def test_dont_freeze_pe_keeps_the_graph_through_frozen_blocks(mode: str) -> None:
    """--dont_freeze_pe: frozen blocks must pass gradients to the (trained) embedding, in every path."""
    seen, g, _ = grads(mode, 2, embed=False)
    assert all(all(seen[b]) for b in range(DEPTH)), seen
    assert 'patch_embed.proj.weight' in g and not any(n.startswith(('blocks.0.', 'blocks.1.')) for n in g)


def test_grad_mode_is_restored_when_a_frozen_block_raises() -> None:
    model = vit()
    freeze(model, 2, embed=True)

    def boom(m, i, o):
        raise RuntimeError('boom')
    h = model.blocks[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match='boom'):
        model(torch.randn(1, 3, 32, 32))
    assert torch.is_grad_enabled() and model.blocks._saved_modes == []
    h.remove()
    model(torch.randn(1, 3, 32, 32))  # and the next forward is normal
    assert torch.is_grad_enabled()


def test_unfrozen_model_is_unchanged_by_the_seam() -> None:
    """Installing the seam with nothing frozen: bit-identical outputs and gradients to the plain timm model."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    a, b = vit().eval(), vit().eval()
    models_vit.ViTUnits(b)
    assert torch.equal(a(x), b(x))
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    assert list(a.state_dict()) == list(b.state_dict())
