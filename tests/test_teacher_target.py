"""The ``teacher`` target (target_teacher.py): shapes, values against a hand computation from the file (blocks[:N],
patch tokens, grid resampling, LayerNorm without affine), frozen (no parameters, no gradients, not in the
optimizer, weights not in the state dict), one teacher pass for all its stages, the FLOP plan line, one-line errors,
a pre-training run whose teacher is a checkpoint of an earlier tiny run, and an exact resume."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import models_vit
import targets
from cli_inproc import cli
from conftest import TINY_PRETRAIN_FLAGS
from models_mim import create_model
from target_teacher import TeacherTarget, file_sha256, load_teacher
from util.errors import UserError

pytestmark = pytest.mark.usefixtures('single_thread')

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=32,
            decoder_num_heads=4)
TEACHER = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3)  # 8x8 tokens, width 48


def _teacher_file(path: Path, seed: int = 0, **kw) -> Path:
    """A timm ViT state dict with its args, as run_finetune/tools.export-style files hold one."""
    torch.manual_seed(seed)
    cfg = {**TEACHER, **kw}
    vit = models_vit.create_model('vit_small_patch16', num_classes=0, global_pool='token', **cfg)
    for p in vit.parameters():  # non-trivial values everywhere (timm zero-inits biases)
        p.data.add_(0.02 * torch.randn_like(p))
    torch.save({'model': vit.state_dict(), 'args': {'model': 'vit_small_patch16', 'num_heads': cfg['num_heads']}},
               path)
    return path


@pytest.fixture
def teacher_file(tmp_path) -> Path:
    return _teacher_file(tmp_path / 'teacher.pth')


def _model(teacher, layer=2, spec='hog,hog,teacher,teacher', seed=0, **kw):
    torch.manual_seed(seed)
    return create_model('MIM_vit_tiny_patch16', **{**TINY, **kw}, stage_targets=spec,
                        target_options=dict(teacher=str(teacher), teacher_layer=layer, input_size=32))


def _imgs(b=2, seed=9):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _reference_tokens(path: Path, layer: int, imgs: torch.Tensor) -> torch.Tensor:
    """By hand: the file's ViT, strictly loaded, its first ``layer`` blocks; patch tokens as a [B, D, 8, 8] map."""
    vit = models_vit.create_model('vit_small_patch16', num_classes=0, global_pool='token', **TEACHER)
    vit.load_state_dict(torch.load(path, map_location='cpu', weights_only=True)['model'])
    vit.eval()
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(imgs))
        for blk in list(vit.blocks)[:layer]:
            x = blk(x)
    x = x[:, 1:]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], 8, 8)


def _ln(cells: torch.Tensor) -> torch.Tensor:
    mean = cells.mean(-1, keepdim=True)
    var = cells.var(-1, unbiased=False, keepdim=True)
    return (cells - mean) / torch.sqrt(var + 1e-6)


def test_values_equal_the_hand_computation_on_every_grid(teacher_file):
    m = _model(teacher_file, layer=2, spec='teacher')  # stage grids 32, 16, 8, 4 against 8x8 teacher tokens
    assert [s.grid for s in m.stages] == [32, 16, 8, 4] and m.target_dims == [48] * 4
    imgs = _imgs()
    got = m.compute_targets(imgs, [0, 1, 2, 3])
    ref = _reference_tokens(teacher_file, 2, imgs)  # [B, 48, 8, 8]
    b = imgs.shape[0]
    same = ref.flatten(2).transpose(1, 2)
    coarse = ref.reshape(b, 48, 4, 2, 4, 2).mean(dim=(3, 5)).flatten(2).transpose(1, 2)  # 2x2 token mean
    fine2 = ref.repeat_interleave(2, 2).repeat_interleave(2, 3).flatten(2).transpose(1, 2)  # each token repeated
    fine4 = ref.repeat_interleave(4, 2).repeat_interleave(4, 3).flatten(2).transpose(1, 2)
    for k, want in zip((0, 1, 2, 3), (fine4, fine2, same, coarse)):
        assert got[k].shape == (b, m.stages[k].num_cells, 48) and got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], _ln(want), rtol=1e-5, atol=1e-5)
    # per cell: zero mean, unit variance over the feature dimension (LayerNorm without affine)
    torch.testing.assert_close(got[3].mean(-1), torch.zeros(b, 16), atol=1e-5, rtol=0)
    # another layer gives other values: the depth is honoured
    other = _model(teacher_file, layer=3, spec='teacher').compute_targets(imgs, [2])[2]
    torch.testing.assert_close(other, _ln(_reference_tokens(teacher_file, 3, imgs).flatten(2).transpose(1, 2)),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, got[2])


def test_teacher_is_frozen_and_the_student_learns(teacher_file):
    from timm.optim import param_groups_weight_decay
    m = _model(teacher_file)
    teacher = m.target.parts[1]
    assert isinstance(teacher, TeacherTarget)
    assert list(teacher.parameters()) == [] and len(teacher.encoder.blocks) == 2  # blocks 3.. are not kept
    tensors = list(teacher.encoder.buffers())
    assert tensors and not any(t.requires_grad for t in tensors)
    ptrs = {t.data_ptr() for t in tensors}
    groups = param_groups_weight_decay(m, 0.05)
    assert not ptrs & {p.data_ptr() for g in groups for p in g['params']}
    m.train()
    assert not teacher.encoder.training  # always in inference mode
    out = m(_imgs())
    out['loss'].backward()
    assert all(t.grad is None for t in tensors)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.decoder[2].parameters() if p.requires_grad)
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # the state dict holds the teacher's identity, not its weights
    keys = [k for k in m.state_dict() if k.startswith('target.parts.1.')]
    assert sorted(keys) == ['target.parts.1.teacher_layer', 'target.parts.1.teacher_sha256']
    assert bytes(m.state_dict()['target.parts.1.teacher_sha256'].tolist()) == file_sha256(str(teacher_file))


def test_one_teacher_pass_for_all_its_stages(teacher_file):
    m = _model(teacher_file, layer=2, spec='teacher')
    calls = []
    m.target.encoder.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    m.compute_targets(_imgs(), [0, 1, 2, 3])
    assert len(calls) == 1


def test_autocast_targets_are_fp32_and_close(teacher_file):
    m = _model(teacher_file, spec='teacher')
    imgs = _imgs()
    ref = m.compute_targets(imgs, [2])[2]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = m.compute_targets(imgs, [2])[2]
    assert low.dtype == torch.float32
    assert (low - ref).abs().mean() < 0.05  # bf16 teacher, same features


def test_state_dict_refuses_another_teacher_or_layer(teacher_file, tmp_path):
    m = _model(teacher_file)
    sd = m.state_dict()
    _model(teacher_file).load_state_dict(sd)  # the same file: loads
    other = _teacher_file(tmp_path / 'other.pth', seed=1)
    with pytest.raises(UserError, match='not the teacher this run was trained with'):
        _model(other).load_state_dict(sd)
    with pytest.raises(UserError, match=r'--teacher_layer 3: the checkpoint was trained on teacher block 2'):
        _model(teacher_file, layer=3).load_state_dict(sd)


def test_plan_line_counts_only_the_kept_blocks(teacher_file):
    from freezeout import measure_unit_flops, step_cost
    from run_pretrain import _subtree_flops, target_plan_lines
    # FlopCounterMode: 2 per multiply-add. Patch embedding: 64 patches of 4x4x3 -> 48; a block of 65 tokens, width
    # 48: qkv, proj, fc1, fc2, and the q.k and a.v matmuls
    n, d = 65, 48
    embed = 2 * 64 * d * 48
    block = 2 * n * d * (3 * d + d + 4 * d + 4 * d) + 2 * 2 * n * n * d
    for layer in (1, 2):
        m = _model(teacher_file, layer=layer)
        f = measure_unit_flops(m, 32, 0.75, torch.device('cpu'))
        fwd = _subtree_flops(f['module_fwd'], 'target.parts.1')
        assert fwd == embed + layer * block
        lines = target_plan_lines(m, f)
        assert len(lines) == 1 and lines[0].startswith(f'teacher target: {teacher_file} (sha256 ')
        assert f'blocks 1-{layer}, width 48, 8x8 tokens -> stage grids [8, 4] of stages [2, 3]' in lines[0]
        share = 100 * fwd / step_cost(f, 0, False)
        assert f'forward {fwd / 1e6:.2f} MFLOP/image under no_grad (no backward) = {share:.1f}% of a training ' \
               f'step' in lines[0]
        assert fwd <= f['shared_fwd']  # in the shared work of the FLOP model
    assert target_plan_lines(_model(teacher_file, spec='hog'), None) == []


@pytest.mark.parametrize('kw,msg', [
    (dict(teacher=None), '--target teacher: needs --teacher CKPT'),
    (dict(teacher_layer=4), '--teacher_layer 4: the teacher {path} has 3 blocks; choose 1..3'),
    (dict(teacher_layer=0), '--teacher_layer 0: the teacher {path} has 3 blocks; choose 1..3'),
    (dict(teacher='missing.pth'), '--teacher missing.pth: file not found'),
])
def test_build_errors_are_one_line(teacher_file, kw, msg):
    opts = {**dict(teacher=str(teacher_file), teacher_layer=2, input_size=32), **kw}
    with pytest.raises(UserError) as e:
        create_model('MIM_vit_tiny_patch16', **TINY, target='teacher', target_options=opts)
    assert str(e.value).startswith(msg.format(path=teacher_file))
    assert '\n' not in str(e.value)


def test_timm_export_and_another_input_size(teacher_file, tmp_path):
    """A tools/export.py export (raw timm state dict + .json recipe) is the same teacher as its source; a teacher
    trained at another resolution gets its position embedding resampled (as the evaluators do) and says so."""
    exported = tmp_path / 'export.pth'
    rc, out, err = cli('tools/export.py', ['--checkpoint', teacher_file, '--output', exported])
    assert rc == 0, err[-2000:]
    imgs = _imgs()
    a = _model(teacher_file, spec='teacher').compute_targets(imgs, [2, 3])
    t = _model(exported, spec='teacher')
    b = t.compute_targets(imgs, [2, 3])
    assert all(torch.equal(a[k], b[k]) for k in (2, 3))
    big = _teacher_file(tmp_path / 'big.pth', img_size=64)  # a 16x16 grid, run at 32 px: 8x8
    m = _model(big, spec='teacher')
    assert m.target.token_grid == 8 and m.target.encoder.pos_embed.shape[1] == 65
    assert 'pos_embed resampled from a 16x16 to a 8x8 patch grid' in m.target.plan_line(m.stages, None, None)


def test_patch_must_divide_the_input(tmp_path):
    f = _teacher_file(tmp_path / 't5.pth', img_size=35, patch_size=5)
    with pytest.raises(UserError, match="teacher's patch size 5 does not divide --input_size 32"):
        load_teacher(str(f), None, 32)


def test_registered_lazily():
    assert targets.resolve_target('teacher') is TeacherTarget
    with pytest.raises(UserError, match='choose hog, pixel, teacher'):
        targets.resolve_target('nope')


# ---- through run_pretrain.py --------------------------------------------------------------------------------------

def _args(demo_root, out, *extra):
    return [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', out, '--vis_freq', '0', *extra]


@pytest.mark.parametrize('extra,needle', [
    (['--target', 'teacher'], 'error: --target teacher: needs --teacher CKPT'),
    (['--teacher', '{dir}/nope.pth'], 'error: --teacher {dir}/nope.pth: file not found'),
    (['--teacher', '{teacher}'], 'error: --teacher {teacher}: no stage uses the teacher target'),
    (['--teacher_layer', '2'], 'error: --teacher_layer 2: no stage uses the teacher target'),
    (['--target', 'teacher', '--teacher', '{teacher}', '--teacher_layer', '7'],
     'error: --teacher_layer 7: the teacher {teacher} has 3 blocks; choose 1..3'),
])
def test_cli_errors(extra, needle, demo_root, tmp_path, teacher_file):
    fill = dict(dir=tmp_path, teacher=teacher_file)
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'o', '--epochs', '1',
                                                *[a.format(**fill) for a in extra]))
    assert rc == 2, (rc, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle.format(**fill)), err
    assert not (tmp_path / 'o').exists()


def test_cli_plan_only_shows_the_teacher(demo_root, teacher_file):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, '', '--epochs', '2', '--plan_only',
                                                '--stage_targets', 'hog,hog,teacher,teacher',
                                                '--teacher', teacher_file, '--teacher_layer', '2'))
    assert rc == 0, err[-2000:]
    line = next(l for l in out.splitlines() if l.startswith('teacher target: '))
    assert 'blocks 1-2, width 48' in line and 'MFLOP/image under no_grad' in line
    assert '% of a training step with nothing frozen' in line


def _losses(out: Path):
    return [json.loads(l)['train_loss'] for l in (out / 'log.txt').read_text().splitlines() if l.strip()]


@pytest.mark.slow
def test_teacher_from_a_tiny_run_trains_and_resumes_exactly(demo_root, tmp_path):
    """The teacher is the checkpoint of a 1-epoch HOG run (our format: stage norms, decoders, HOG buffers ignored);
    the student trains on it; a resume from its epoch-0 checkpoint repeats epoch 1 exactly."""
    first = tmp_path / 'first'
    rc, out, err = cli('run_pretrain.py', _args(demo_root, first, '--epochs', '1', '--warmup_epochs', '0'))
    assert rc == 0, err[-3000:]
    teacher = first / 'checkpoint-last.pth'
    flags = ['--epochs', '2', '--save_freq', '1', '--stage_targets', 'hog,hog,teacher,teacher',
             '--teacher', str(teacher), '--teacher_layer', '3', '--t_0', '0.8', '--how_scale', 'cubic']
    ref, res = tmp_path / 'ref', tmp_path / 'res'
    rc, out, err = cli('run_pretrain.py', _args(demo_root, ref, *flags))
    assert rc == 0, err[-3000:]
    assert 'teacher target: ' in out and 'blocks 1-3, width 64, 8x8 tokens' in out
    losses = _losses(ref)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    res.mkdir()
    shutil.copy(ref / 'checkpoint-0.pth', res / 'checkpoint-last.pth')
    (res / 'log.txt').write_text((ref / 'log.txt').read_text().splitlines(keepends=True)[0])
    rc, out, err = cli('run_pretrain.py', _args(demo_root, res, *flags))
    assert rc == 0 and 'Resumed from' in out, err[-3000:]
    assert _losses(res) == losses
    # the student's checkpoint holds no teacher weights and is read by the evaluators as any other
    ckpt = torch.load(ref / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert not any('.encoder.' in k for k in ckpt['model'])
    rc, out, err = cli('run_knn.py', ['--finetune', ref / 'checkpoint-last.pth', '--data_path', demo_root,
                                      '--output_dir', tmp_path / 'knn', '--nb_knn', '5', '--device', 'cpu',
                                      '--num_workers', '0', '--batch_size', '8'])
    assert rc == 0 and 'k=5' in out, err[-2000:]
    # a changed teacher file is refused on resume
    bad = tmp_path / 'bad'
    bad.mkdir()
    shutil.copy(ref / 'checkpoint-0.pth', bad / 'checkpoint-last.pth')
    other = _teacher_file(tmp_path / 'other.pth', embed_dim=64, num_heads=4, depth=4)
    swapped = [other if a == str(teacher) else a for a in flags]
    rc, out, err = cli('run_pretrain.py', _args(demo_root, bad, *map(str, swapped)))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and 'Traceback' not in err, err[-2000:]
    assert lines[0].startswith(f'error: --teacher {other}: not the teacher this run was trained with'), lines
