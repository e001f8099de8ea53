"""HOG targets (models_mim.HOGTargets): the reference fixture, a literal slow reference, one pass == per stage,
forward layout, autocast, and the --hog_bias draw."""
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models_mim import HOGTargets, create_model

pytestmark = pytest.mark.usefixtures('single_thread')

# Shipped with the tests (see tests/fixtures/README.md); the project's ../shared copy is only a fallback.
FIXTURE_CANDIDATES = (Path(__file__).resolve().parent / 'fixtures' / 'hog_reference.npz',
                      Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'hog_reference.npz')
POOLS = [4, 8, 16, 32]


# ---- literal slow reference (the reference code's HOGLayer, written out) --------------------------------------------

def reference_hog(imgs: torch.Tensor, nbins: int, pool: int, bias=None) -> torch.Tensor:
    """Per channel: reflect-pad Sobel conv (+ optional bias), atan2(ch0, ch1), floor(phi/pi*nb) % nb, full-res
    one-hot x magnitude, AvgPool2d(pool), L2 over bins; R, G, B concatenated -> [B, 3*nb, H/pool, W/pool]."""
    conv = nn.Conv2d(1, 2, 3, stride=1, padding=1, padding_mode='reflect', bias=bias is not None)
    sobel = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
    with torch.no_grad():
        conv.weight.copy_(torch.stack([sobel, sobel.t()]).unsqueeze(1))
        if bias is not None:
            conv.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    pooler = nn.AvgPool2d(pool, stride=pool, padding=0, ceil_mode=False, count_include_pad=True)
    outs = []
    with torch.no_grad():
        for c in range(imgs.shape[1]):
            x = imgs[:, c:c + 1].float()
            gxy = conv(x)
            mag = gxy.norm(dim=1)
            phase = torch.atan2(gxy[:, 0, :, :], gxy[:, 1, :, :])
            phase_int = torch.floor(phase / math.pi * nbins).long() % nbins
            b, h, w = mag.shape
            out = torch.zeros((b, nbins, h, w), dtype=torch.float32)
            out.scatter_(1, phase_int[:, None], mag[:, None])
            out = pooler(out)
            outs.append(F.normalize(out, p=2, dim=1))
    return torch.cat(outs, dim=1)


def _images(seed=0, b=2, size=32):
    g = torch.Generator().manual_seed(seed)
    # normalised-image-like values with some flat regions (exercise the zero-histogram cells)
    x = torch.randn(b, 3, size, size, generator=g)
    x[:, :, :8, :8] = 0.25
    return x


def find_fixture():
    return next((p for p in FIXTURE_CANDIDATES if p.is_file()), None)


def _fixture():
    path = find_fixture()
    if path is None:
        msg = (f'HOG reference fixture not found at {" or ".join(map(str, FIXTURE_CANDIDATES))} '
               f'(tests/fixtures/hog_reference.npz ships with the repository)')
        if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
            pytest.fail(msg + '; CI must check the HOG targets against the reference', pytrace=False)
        pytest.skip(msg)
    return np.load(path)


def _report(name, got, ref, tol=1e-5):
    err = (got - ref).abs()
    frac_ok = (err <= tol).float().mean().item()
    idx = np.unravel_index(int(err.argmax()), tuple(err.shape))
    worst = (f'{name}: worst cell image={idx[0]} feature={idx[1]} (channel {"RGB"[idx[1] // (got.shape[1] // 3)]}, '
             f'bin {idx[1] % (got.shape[1] // 3)}) row={idx[2]} col={idx[3]}: got {got[idx].item():.7g} vs '
             f'reference {ref[idx].item():.7g} (abs err {err.max().item():.3g}); {100 * frac_ok:.3f}% within {tol}')
    return frac_ok, worst


# ---- fixture --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('nb', [9, 18])
def test_matches_reference_fixture(nb):
    data = _fixture()
    imgs = torch.from_numpy(data['images'])
    maps = HOGTargets(nb, POOLS).maps(imgs)
    assert sorted(maps) == [0, 1, 2, 3]
    for k, pool in enumerate(POOLS):
        ref = torch.from_numpy(data[f'hog_nb{nb}_pool{pool}'])
        got = maps[k]
        assert got.shape == ref.shape == (3, 3 * nb, 64 // pool, 64 // pool)
        assert got.dtype == torch.float32
        frac_ok, worst = _report(f'hog_nb{nb}_pool{pool}', got, ref)
        assert frac_ok >= 0.999, worst
        # the fixture is a real HOG: non-trivial, unit-norm (or zero) cells
        norms = ref.view(3, 3, nb, -1).norm(dim=2)
        assert ((norms - 1).abs() < 1e-4).logical_or(norms < 1e-6).all()


def test_fixture_ships_with_the_tests_and_missing_fails_in_ci(monkeypatch, tmp_path):
    import sys
    here = sys.modules[__name__]
    assert find_fixture() == FIXTURE_CANDIDATES[0], 'tests/fixtures/hog_reference.npz must ship with the tests'
    if FIXTURE_CANDIDATES[1].is_file():  # the shipped copy is the project's reference file, byte for byte
        assert FIXTURE_CANDIDATES[0].read_bytes() == FIXTURE_CANDIDATES[1].read_bytes()
    monkeypatch.setattr(here, 'FIXTURE_CANDIDATES', (tmp_path / 'a.npz', tmp_path / 'b.npz'))
    monkeypatch.setenv('CI', 'true')
    with pytest.raises(pytest.fail.Exception, match='CI must check the HOG targets'):
        _fixture()
    monkeypatch.delenv('CI')
    with pytest.raises(pytest.skip.Exception, match='not found'):
        _fixture()


def test_fixture_equals_literal_reference():
    """Guards the literal reference used below: it reproduces the shared fixture."""
    data = _fixture()
    imgs = torch.from_numpy(data['images'])
    for nb in (9, 18):
        for pool in POOLS:
            frac_ok, worst = _report(f'literal nb{nb} pool{pool}', reference_hog(imgs, nb, pool),
                                     torch.from_numpy(data[f'hog_nb{nb}_pool{pool}']))
            assert frac_ok >= 0.999, worst


# ---- one pass vs per stage vs literal -------------------------------------------------------------------------------

@pytest.mark.parametrize('nb', [9, 18])
def test_one_pass_equals_per_stage_and_literal(nb):
    imgs = _images(1, b=2, size=64)
    one_pass = HOGTargets(nb, POOLS).maps(imgs)
    for k, pool in enumerate(POOLS):
        single = HOGTargets(nb, [pool]).maps(imgs)[0]
        literal = reference_hog(imgs, nb, pool)
        assert one_pass[k].shape == single.shape == literal.shape == (2, 3 * nb, 64 // pool, 64 // pool)
        torch.testing.assert_close(one_pass[k], single, atol=1e-6, rtol=0)
        frac_ok, worst = _report(f'one-pass nb{nb} pool{pool} vs literal', one_pass[k], literal)
        assert frac_ok == 1.0, worst


def test_non_nested_cells_and_stage_subsets():
    """Cell sizes that are not multiples of the finest one (2, 3, 6) and a subset of stages still match the literal
    reference; asking for a subset returns exactly those stages."""
    imgs = _images(2, b=2, size=36)
    hog = HOGTargets(9, [2, 3, 6, 12])
    full = hog.maps(imgs)
    for k, pool in enumerate([2, 3, 6, 12]):
        frac_ok, worst = _report(f'pool{pool}', full[k], reference_hog(imgs, 9, pool))
        assert frac_ok == 1.0, worst
    sub = hog.maps(imgs, stages=[1, 3])
    assert sorted(sub) == [1, 3]
    for k in (1, 3):
        torch.testing.assert_close(sub[k], full[k], atol=1e-6, rtol=0)


def test_flat_cells_are_zero_and_cells_unit_norm():
    imgs = torch.zeros(1, 3, 32, 32)
    imgs[:, :, 16:, :] = 1.0  # one horizontal edge at row 16
    maps = HOGTargets(9, [4, 8]).maps(imgs)
    m4 = maps[0]
    assert torch.count_nonzero(m4[:, :, :3]) == 0 and torch.count_nonzero(m4[:, :, 5:]) == 0
    norms = m4[:, :9, 3:5].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    # a horizontal edge: gradient along y only -> ch0 (x-derivative) = 0, ch1 != 0 -> atan2(0, +-v) in {0, pi}
    # -> bin floor(0) = 0 or floor(nb) % nb = 0: every edge cell is a one-hot on bin 0
    assert torch.allclose(m4[0, 0, 3:5], torch.ones(2, 8))


# ---- forward() layout -----------------------------------------------------------------------------------------------

def test_forward_layout_is_maps_flattened_row_major():
    imgs = _images(3, b=3, size=32)
    hog = HOGTargets(9, [1, 2, 4, 8])
    maps, flat = hog.maps(imgs), hog(imgs)
    for k, c in enumerate([1, 2, 4, 8]):
        g = 32 // c
        assert flat[k].shape == (3, g * g, 27)
        torch.testing.assert_close(flat[k], maps[k].flatten(2).transpose(1, 2), atol=0, rtol=0)
        # explicit row-major check for one cell: index = row * g + col
        r, col = g - 1, min(1, g - 1)
        torch.testing.assert_close(flat[k][:, r * g + col], maps[k][:, :, r, col], atol=0, rtol=0)
    sub = hog(imgs, stages=[2])
    assert list(sub) == [2]


# ---- autocast -------------------------------------------------------------------------------------------------------

def test_autocast_bf16_keeps_fp32_and_identical():
    imgs = _images(4, b=2, size=32)
    hog = HOGTargets(9, [2, 4, 8])
    plain_maps, plain_flat = hog.maps(imgs), hog(imgs)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        amp_maps, amp_flat = hog.maps(imgs), hog(imgs)
    for k in plain_maps:
        assert amp_maps[k].dtype == torch.float32 and amp_flat[k].dtype == torch.float32
        assert torch.equal(amp_maps[k], plain_maps[k])
        assert torch.equal(amp_flat[k], plain_flat[k])


def test_model_targets_fp32_under_autocast():
    torch.manual_seed(0)
    model = create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    imgs = _images(5, b=2, size=32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(imgs, return_vis=True)
    ref = model.hog(imgs)
    for k, t in out['target'].items():
        assert t.dtype == torch.float32
        assert torch.equal(t, ref[k])


# ---- hog_bias -------------------------------------------------------------------------------------------------------

def test_hog_bias_range_determinism_and_literal():
    a = HOGTargets(9, POOLS, bias=True, bias_seed=7)
    b = HOGTargets(9, POOLS, bias=True, bias_seed=7)
    c = HOGTargets(9, POOLS, bias=True, bias_seed=8)
    assert a.bias.shape == (4, 2)
    assert torch.equal(a.bias, b.bias)
    assert not torch.equal(a.bias, c.bias)
    assert (a.bias.abs() < 1 / 3).all()
    # the stages get different biases (the reference's four HOG layers each draw their own)
    assert len({tuple(r.tolist()) for r in a.bias}) == 4
    assert not a.bias.requires_grad and 'bias' in a.state_dict()
    # over many seeds the draws cover U(-1/3, 1/3): mean ~ 0, both signs, spread close to the full range
    draws = torch.cat([HOGTargets(9, POOLS, bias=True, bias_seed=s).bias.flatten() for s in range(64)])
    assert draws.min() < -0.3 and draws.max() > 0.3 and draws.abs().max() < 1 / 3
    assert abs(draws.mean().item()) < 0.05

    imgs = _images(6, b=2, size=64)
    maps = a.maps(imgs)
    for k, pool in enumerate(POOLS):
        frac_ok, worst = _report(f'bias pool{pool}', maps[k], reference_hog(imgs, 9, pool, bias=a.bias[k]))
        assert frac_ok == 1.0, worst
    # with a bias a flat cell is no longer zero: it becomes a fixed unit vector
    flat = torch.zeros(1, 3, 32, 32)
    fm = a.maps(flat)[0]
    torch.testing.assert_close(fm.view(1, 3, 9, -1).norm(dim=2), torch.ones(1, 3, 64))
    # and the bias changes the targets of a textured image
    assert not torch.allclose(maps[0], HOGTargets(9, POOLS).maps(imgs)[0])
