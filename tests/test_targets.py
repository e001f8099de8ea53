"""The reconstruction-target seam (targets.py): Stage/Target contract, the hog default bit-identical to the code
before the seam, the resolver's one-line errors, a plugin from outside the repository trained through the real CLI
and read by every evaluator, the pixel target and --stage_targets."""
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import targets
from cli_inproc import cli
from models_mim import HOGTargets, create_model
from util.errors import UserError

pytestmark = pytest.mark.usefixtures('single_thread')

FIXTURES = Path(__file__).resolve().parent / 'fixtures'
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=32,
            decoder_num_heads=4)
CLI_TINY = ['--input_size', '32', '--patch_size', '4', '--embed_dim', '32', '--depth', '4', '--num_heads', '2',
            '--decoder_embed_dim', '32', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu',
            '--model', 'MIM_vit_tiny_patch16']

# The plugin of issue 20 §2, verbatim.
MEAN_COLOR = '''import torch.nn.functional as F
import targets

class MeanColor(targets.Target):
    def dim(self, stage):
        return 3
    def forward(self, images, stage):
        return F.avg_pool2d(images, stage.cell_size).flatten(2).transpose(1, 2)
'''


def tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return create_model('MIM_vit_tiny_patch16', **{**TINY, **kw})


def _imgs(b: int = 2, size: int = 32, seed: int = 9) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """tmp_path/plugins/my_target.py (outside the repository) on the import path, as PYTHONPATH puts it."""
    d = tmp_path / 'plugins'
    d.mkdir()
    (d / 'my_target.py').write_text(MEAN_COLOR)
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.setenv('PYTHONPATH', str(d))
    yield d
    sys.modules.pop('my_target', None)


# ---- the contract ---------------------------------------------------------------------------------------------------

def test_stages_describe_every_decoder_and_size_its_head():
    m = tiny()
    assert [s.index for s in m.stages] == [0, 1, 2, 3]
    assert [s.block for s in m.stages] == m.stage_blocks == [1, 3, 1, 3]
    assert [s.scale for s in m.stages] == [4, 2, 1, 0.5]
    assert [s.cell_size for s in m.stages] == m.cell_sizes == [1, 2, 4, 8]
    assert [s.grid for s in m.stages] == [32, 16, 8, 4]
    assert all(s.num_cells == s.grid ** 2 and s.img_size == 32 and s.patch_size == 4 and s.in_chans == 3
               for s in m.stages)
    assert isinstance(m.target, targets.HOGTarget) and m.target.target_name == 'hog'
    assert m.target_dims == [27] * 4
    for dec, d in zip(m.decoder, m.target_dims):
        assert dec.pred[-1].out_channels == d
    # the target is never trained: no trainable parameter outside the FreezeOut units
    assert not any(p.requires_grad for p in m.target.parameters())


def test_plugin_dims_shape_the_decoders(plugin_dir):
    m = tiny(target='my_target:MeanColor')
    assert m.target_dims == [3, 3, 3, 3] and [d.pred[-1].out_channels for d in m.decoder] == [3] * 4
    imgs = _imgs()
    t = m.compute_targets(imgs, [0, 1, 2, 3])
    for s in m.stages:  # row-major cells of cell_size px: the mean colour of each cell
        ref = imgs.view(2, 3, s.grid, s.cell_size, s.grid, s.cell_size).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(t[s.index], ref)
    with pytest.raises(AttributeError):
        m.hog  # noqa: B018 - HOG-specific access must fail for a non-HOG model


def test_default_target_is_hog_and_registry_names():
    assert {'hog', 'pixel'} <= set(targets.TARGETS)
    assert targets.resolve_target('hog') is targets.HOGTarget
    a, b = tiny(), tiny(target='hog')
    imgs = _imgs()
    torch.manual_seed(3)
    la = a(imgs)['loss']
    torch.manual_seed(3)
    assert torch.equal(la, b(imgs)['loss'])


# ---- hog: bit-identical to the code before the seam -----------------------------------------------------------------

def _load_step_reference():
    sys.path.insert(0, str(FIXTURES))
    try:
        import make_hog_step_reference as ref
    finally:
        sys.path.remove(str(FIXTURES))
    return ref, json.loads((FIXTURES / 'hog_step_reference.json').read_text())


@pytest.mark.parametrize('case', ['plain', 'hog_bias'])
def test_hog_step_equals_the_pre_seam_code(case):
    """Init, forward losses and the loss after one AdamW step equal what the code before the seam (HOG inside
    models_mim.py, commit cb7813a) computed for the same seeds (tests/fixtures/make_hog_step_reference.py). The
    tolerance only absorbs another CPU's float kernels; on one machine the numbers are equal."""
    ref, data = _load_step_reference()
    got = ref.reference_losses(create_model, case == 'hog_bias')
    want = data[case]
    assert got['param_abs_sum'] == pytest.approx(want['param_abs_sum'], rel=1e-9)
    assert got['stage_losses'] == pytest.approx(want['stage_losses'], rel=1e-6)
    assert got['loss'] == pytest.approx(want['loss'], rel=1e-6)
    assert got['loss_after_step'] == pytest.approx(want['loss_after_step'], rel=1e-6)


@pytest.mark.parametrize('hog_bias', [False, True])
def test_hog_target_is_the_engine_bit_for_bit(hog_bias):
    """The model's targets are exactly HOGTargets' (the engine test_hog.py checks against the reference fixture),
    and the whole loss equals the pre-seam composition: engine targets -> encoder -> decoders -> weighted sum."""
    m = tiny(hog_bias=hog_bias)
    imgs = _imgs()
    engine = HOGTargets(9, m.cell_sizes, bias=hog_bias, bias_seed=0)
    t_model = m.compute_targets(imgs, [0, 1, 2, 3])
    t_engine = engine(imgs, [0, 1, 2, 3])
    for k in range(4):
        assert torch.equal(t_model[k], t_engine[k])
    sub, sub_engine = m.compute_targets(imgs, [1, 3]), engine(imgs, [1, 3])  # FreezeOut switched stages off
    assert sorted(sub) == [1, 3] and all(torch.equal(sub[k], sub_engine[k]) for k in (1, 3))
    torch.manual_seed(5)
    new = m(imgs)['loss']
    torch.manual_seed(5)
    latents, mask, ids = m.forward_encoder(imgs, 0.75)
    losses, _ = m.decode(latents, mask, ids, t_engine, 0.75)
    old = sum(m.stage_weight[k] * losses[k] for k in range(4))
    assert torch.equal(new, old)


def test_pre_seam_checkpoint_with_hog_bias_loads():
    """A checkpoint written before the seam keeps the HOG bias under 'hog.bias'; it loads (strictly) into the
    target's engine."""
    a = tiny(hog_bias=True, hog_bias_seed=3)
    sd = a.state_dict()
    assert 'target.hog.bias' in sd
    old = {('hog.bias' if k == 'target.hog.bias' else k): v for k, v in sd.items()}
    b = tiny(hog_bias=True, hog_bias_seed=4)
    assert not torch.equal(b.hog.bias, a.hog.bias)
    b.load_state_dict(old)
    assert torch.equal(b.hog.bias, a.hog.bias)


def test_flop_plan_times_only_uncounted_targets(plugin_dir):
    from freezeout import measure_unit_flops
    hog = measure_unit_flops(tiny(), 32, 0.75, torch.device('cpu'))
    assert hog['target_fwd'] > 0 and hog['hog_fwd'] == hog['target_fwd']
    assert hog['total_fwd'] == pytest.approx(sum(hog['unit_fwd']) + hog['shared_fwd'])
    plug = measure_unit_flops(tiny(target='my_target:MeanColor'), 32, 0.75, torch.device('cpu'))
    assert plug['target_fwd'] == 0.0  # flop_counted (the default): nothing timed


def test_pictures_of_a_plugin_target(plugin_dir):
    from util.vis import render_stages
    m = tiny(target='my_target:MeanColor')
    pics = render_stages(m, _imgs(), 0.75)
    assert set(pics) == {'vis/input_mask'} | {f'vis/stage{k}_target_vs_pred' for k in range(4)}
    for img in pics.values():
        assert img.ndim == 3 and img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1


# ---- resolver errors ------------------------------------------------------------------------------------------------

class _NotATarget(torch.nn.Module):
    pass


class _BadInit(targets.Target):
    def __init__(self):
        super().__init__()


class _BadDim(targets.Target):
    def dim(self, stage):
        return 0

    def forward(self, images, stage):
        return images


class _BadShape(targets.Target):
    def dim(self, stage):
        return 3

    def forward(self, images, stage):
        return images.flatten(2)  # [B, 3, H·W]: channel-first, not [B, cells, dim]


@pytest.mark.parametrize('spec,needle', [
    ('nope', r"--target 'nope': unknown target; choose hog, pixel"),
    ('no_such_module_xyz:Foo', r"--target no_such_module_xyz:Foo: cannot import 'no_such_module_xyz' "
                               r"\(ModuleNotFoundError"),
    ('targets:Missing', r"--target targets:Missing: module 'targets' .* has no 'Missing'"),
    ('test_targets:_NotATarget', r'--target test_targets:_NotATarget: _NotATarget is not a subclass of '
                                 r'targets.Target'),
    ('test_targets:_BadInit', r'_BadInit.__init__ must accept \(stages, options\)'),
    ('test_targets:_BadDim', r'target test_targets:_BadDim: dim\(stage 0\) = 0; must be a positive int'),
    ('targets:', r"--target 'targets:': write module:Class"),
])
def test_resolver_errors_are_one_line_user_errors(spec, needle):
    with pytest.raises(UserError, match=needle) as e:
        tiny(target=spec)
    assert '\n' not in str(e.value)


def test_wrong_target_shape_is_one_line():
    m = tiny(target=_BadShape)
    with pytest.raises(UserError, match=r'target .*_BadShape returned \[2, 3, 1024\] for stage 0; expected '
                                        r'\[B, cells, dim\] = \[2, 1024, 3\]'):
        m(_imgs())


@pytest.mark.parametrize('argv,needle', [
    (['--target', 'nope'], "error: --target 'nope': unknown target"),
    (['--target', 'no_such_module_xyz:Foo'], "error: --target no_such_module_xyz:Foo: cannot import"),
    (['--target', 'a b'], "error: --target 'a b': 'a b' is neither a target name"),
    (['--stage_targets', 'hog,,pixel'], "error: --stage_targets 'hog,,pixel': '' is neither a target name"),
    (['--stage_targets', 'hog,pixel'], "error: --stage_targets 'hog,pixel': 2 targets for 4 stages; give one per "
                                       "stage"),
])
def test_cli_target_errors(argv, needle, demo_root, tmp_path):
    rc, out, err = cli('run_pretrain.py', [*CLI_TINY, '--data_path', demo_root, '--output_dir', tmp_path / 'o',
                                           '--epochs', '1', *argv])
    assert rc == 2, (rc, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), err
    assert not (tmp_path / 'o').exists()


# ---- the plugin through the real CLI, read by every evaluator ------------------------------------------------------

def _train_loss(out: Path):
    return [json.loads(line)['train_loss'] for line in (out / 'log.txt').read_text().splitlines() if line.strip()]


@pytest.fixture
def mean_color_run(plugin_dir, demo_root, tmp_path):
    out = tmp_path / 'run'
    rc, stdout, err = cli('run_pretrain.py', [*CLI_TINY, '--data_path', demo_root, '--output_dir', out,
                                              '--epochs', '4', '--warmup_epochs', '1', '--blr', '1e-3',
                                              '--save_freq', '4', '--target', 'my_target:MeanColor'])
    assert rc == 0, err[-3000:]
    return out


def test_mean_color_plugin_trains_from_outside_the_repo(mean_color_run):
    assert not str(mean_color_run).startswith(str(Path(targets.__file__).parent))
    losses = _train_loss(mean_color_run)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    ckpt = torch.load(mean_color_run / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert ckpt['args']['target'] == 'my_target:MeanColor'
    assert ckpt['model']['decoder.2.pred.0.weight'].shape[0] == 3  # the scale-1 head is one 1x1 conv to dim 3


def test_mean_color_checkpoint_is_read_by_every_evaluator(mean_color_run, demo_root, tmp_path):
    ckpt = str(mean_color_run / 'checkpoint-last.pth')
    common = ['--model', 'vit_tiny_patch16', '--finetune', ckpt, '--data_path', demo_root, '--input_size', '32',
              '--num_workers', '0', '--device', 'cpu', '--batch_size', '8']
    rc, out, err = cli('run_knn.py', [*common, '--output_dir', tmp_path / 'knn', '--nb_knn', '5'])
    assert rc == 0, err[-3000:]
    assert 'k-NN k=5: top-1' in out and 'missing (fresh init): none' in out  # the whole encoder came from it
    for script in ('run_linprobe.py', 'run_finetune.py'):
        rc, out, err = cli(script, [*common, '--output_dir', tmp_path / script, '--epochs', '1',
                                    '--warmup_epochs', '0'])
        assert rc == 0, (script, err[-3000:])
        assert '* Acc@1' in out and re.search(r'--finetune \S+: loaded \d+ tensors', out), script


# ---- pixel target and --stage_targets -------------------------------------------------------------------------------

def _mae_norm_pix(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE's patchify + norm_pix_loss target, written as MAE does (einsum 'nchpwq->nhwpqc', var unbiased)."""
    n, c, h, _ = imgs.shape
    g = h // p
    x = torch.einsum('nchpwq->nhwpqc', imgs.reshape(n, c, g, p, g, p)).reshape(n, g * g, p * p * c)
    mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + 1.e-6) ** .5


def test_pixel_target_shapes_and_normalisation_formula():
    m = tiny(target='pixel')
    assert m.target_dims == [3 * c * c for c in (1, 2, 4, 8)] == [3, 12, 48, 192]
    imgs = _imgs(b=2)
    t = m.compute_targets(imgs, [0, 1, 2, 3])
    for s in m.stages:
        assert t[s.index].shape == (2, s.grid ** 2, 3 * s.cell_size ** 2) and t[s.index].dtype == torch.float32
        torch.testing.assert_close(t[s.index], _mae_norm_pix(imgs, s.cell_size), atol=0, rtol=0)
    # literally, for one cell: its pixels in (row, column, channel) order, minus their mean, over sqrt(var + 1e-6)
    s = m.stages[2]
    i, j = 3, 5
    v = imgs[1, :, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].permute(1, 2, 0).reshape(-1).double()
    lit = (v - v.mean()) / math.sqrt(float(v.var(unbiased=True)) + 1e-6)
    torch.testing.assert_close(t[2][1, i * s.grid + j].double(), lit, atol=1e-5, rtol=1e-5)
    c = t[2][1, i * s.grid + j]
    assert abs(float(c.mean())) < 1e-5 and abs(float(c.var()) - 1) < 1e-3  # every cell: mean 0, variance ~1
    # fp32 under autocast, and the loss trains every decoder
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert m.compute_targets(imgs, [3])[3].dtype == torch.float32
    out = m(imgs)
    out['loss'].backward()
    assert all(d.pred[-1].weight.grad is not None for d in m.decoder)
    assert m.target.flop_counted and m.target.uncounted_stages(m.stages) == []


def test_pixel_target_rejects_one_value_cells():
    with pytest.raises(UserError, match=r'pixel target at stage 0: a 1-px cell of 1 channel has one value'):
        tiny(target='pixel', in_chans=1)


def test_stage_targets_mix_hog_and_pixel():
    m = tiny(stage_targets='hog,hog,pixel,pixel')
    assert isinstance(m.target, targets.StageTargets) and len(m.target.parts) == 2  # one instance per name
    assert m.target.target_name == 'hog,hog,pixel,pixel'
    assert m.target_dims == [27, 27, 48, 192]
    assert [d.pred[-1].out_channels for d in m.decoder] == m.target_dims
    imgs = _imgs()
    t = m.compute_targets(imgs, [0, 1, 2, 3])
    hog = HOGTargets(9, m.cell_sizes)(imgs, [0, 1])
    assert torch.equal(t[0], hog[0]) and torch.equal(t[1], hog[1])
    assert torch.equal(t[2], _mae_norm_pix(imgs, 4)) and torch.equal(t[3], _mae_norm_pix(imgs, 8))
    assert list(m.compute_targets(imgs, [3, 1])) == [3, 1]  # exactly the stages asked for
    assert [s.index for s in m.target.uncounted_stages(m.stages)] == [0, 1]  # the FLOP plan times HOG only
    out = m(imgs)
    assert torch.isfinite(out['loss']) and sorted(out['stage_losses']) == [0, 1, 2, 3]
    from util.vis import render_stages
    assert len(render_stages(m, imgs, 0.75)) == 5


@pytest.mark.parametrize('spec', ['hog', 'hog,hog,hog,hog', ['hog'] * 4])
def test_stage_targets_default_unchanged(spec):
    """No --stage_targets, --stage_targets hog and one hog per stage are the same run, bit for bit."""
    a, b = tiny(), tiny(stage_targets=spec)
    assert isinstance(b.target, targets.HOGTarget)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    imgs = _imgs()
    torch.manual_seed(3)
    la = a(imgs)['loss']
    torch.manual_seed(3)
    assert torch.equal(la, b(imgs)['loss'])


def test_stage_targets_single_value_applies_to_all():
    assert targets.parse_stage_targets('pixel', 4) == ['pixel'] * 4
    assert targets.parse_stage_targets(' hog , pixel ,hog,hog ', 4) == ['hog', 'pixel', 'hog', 'hog']
    m = tiny(stage_targets='pixel', all_stages=True)
    assert len(m.stages) == 4 and isinstance(m.target, targets.PixelTarget)
    with pytest.raises(UserError, match=r"--stage_targets 'hog,pixel,hog': 3 targets for 4 stages"):
        tiny(stage_targets='hog,pixel,hog')


def test_cli_stage_targets_trains(demo_root, tmp_path):
    out = tmp_path / 'run'
    rc, _, err = cli('run_pretrain.py', [*CLI_TINY, '--data_path', demo_root, '--output_dir', out, '--epochs', '2',
                                         '--warmup_epochs', '1', '--stage_targets', 'hog,hog,pixel,pixel'])
    assert rc == 0, err[-3000:]
    losses = _train_loss(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    ckpt = torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert ckpt['args']['stage_targets'] == 'hog,hog,pixel,pixel'
    assert ckpt['model']['decoder.3.pred.1.weight'].shape[0] == 192  # scale 0.5: pool + 1x1 conv to 3·8·8
