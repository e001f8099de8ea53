"""LocalMIM's and ViTFreeze's own pre-training checkpoints (issue 24 item 5), built here in their layout, no download.

The layout is the reference models_mim.MaskedAutoencoderViT's (LocalMIM ViT/models_mim.py; ViTFreeze ViT/models_mim.py)
and their run_pretrain.py's ``misc.save_model``: ``{model, optimizer, epoch, scaler, args: argparse.Namespace}``.
Model keys are ours except the HOG layers, ``hog_enc.k.conv.weight`` (the fixed Sobel pair, a parameter there) and
``hog_enc.k.conv.bias`` (--hog_bias). LocalMIM's optimizer: timm ``add_weight_decay`` = [no decay, decay] over the
trainable parameters in model order. ViTFreeze's FreezeOut optimizer (util/freezeout_utils.create_param_groups): one
group per parameter, FreezeOut layers first (``layer_index``: patch embed 0, block b -> b+1, a stage's norm and decoder
-> its block's), then cls_token; a frozen layer's groups and state are deleted, and so are the norm, decoder and HOG
layer of a stage whose block froze (``del self.norm[0]`` ..., which renumbers the ModuleLists): the seed's k-NN log of
``full_pretrain_out_freezeout_cubic_t0_8_1gpu_save5/checkpoint-99.pth`` lists exactly ``decoder.0.*``,
``hog_enc.0.conv.weight``, ``norm.0.*`` as the stage keys left, ``norm.0`` being the last block's stage norm.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / 'tests')) if p not in sys.path]
from cli_inproc import cli  # noqa: E402

ARCH = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4)  # stages fed by blocks 1, 3, 3, 5
FLAGS = ['--input_size', '32', '--patch_size', '4', '--embed_dim', '64', '--depth', '6', '--num_heads', '4']
SOBEL = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
REF_FIXED = re.compile(r'^(pos_embed|decoder\.\d+\.pos_embed|hog_enc\..*)$')  # requires_grad=False in the reference


# ---- the reference layout --------------------------------------------------------------------------------------

def trained_mim(hog_bias: bool = False, seed: int = 0):
    """One of our LocalMIMs (tiny, 64-wide, depth 6), its four stage norms made distinct."""
    import models_mim
    torch.manual_seed(seed)
    mim = models_mim.create_model('MIM_vit_tiny_patch16', **ARCH, hog_bias=hog_bias, decoder_embed_dim=32)
    with torch.no_grad():
        for k, n in enumerate(mim.norm):  # distinct stage norms, so a wrong mapping cannot go unnoticed
            n.weight.fill_(1.0 + k)
            n.bias.fill_(0.1 * k)
    return mim


def ref_model_state(mim, removed: int = 0) -> Dict[str, torch.Tensor]:
    """``mim`` as the reference model's state dict; ``removed`` first stages deleted (ViTFreeze), the rest renumbered.
    Key order: the reference's (cls_token, pos_embed, patch_embed, blocks, norm, decoder, hog_enc)."""
    sd = mim.state_dict()
    out: Dict[str, torch.Tensor] = OrderedDict()
    for k, v in sd.items():
        if k.endswith('hog.bias'):  # the HOG target's bias (target.hog.bias)
            continue
        m = re.match(r'^(norm|decoder)\.(\d+)\.(.*)$', k)
        if m:
            if int(m.group(2)) < removed:
                continue
            k = f'{m.group(1)}.{int(m.group(2)) - removed}.{m.group(3)}'
        out[k] = v.clone()
    for j in range(len(mim.norm) - removed):
        out[f'hog_enc.{j}.conv.weight'] = torch.stack([SOBEL, SOBEL.t()])[:, None].clone()  # HOGLayer.conv: [2,1,3,3]
        bias = next((v for k, v in sd.items() if k.endswith('hog.bias')), None)
        if bias is not None:
            out[f'hog_enc.{j}.conv.bias'] = bias[j + removed].clone()
    return out


def _ours(ref_key: str, removed: int) -> str:
    m = re.match(r'^(norm|decoder)\.(\d+)\.(.*)$', ref_key)
    return f'{m.group(1)}.{int(m.group(2)) + removed}.{m.group(3)}' if m else ref_key


def _stepped(groups: List[dict], mim) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    for _ in range(2):
        mim(torch.rand(2, 3, 32, 32))['loss'].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def localmim_checkpoint(mim, epoch: int = 0) -> dict:
    """LocalMIM's save_model: [no decay, decay] groups in reference parameter order, args a Namespace."""
    params = dict(mim.named_parameters())
    names = [_ours(k, 0) for k in ref_model_state(mim) if not REF_FIXED.match(k)]
    no_decay = [n for n in names if params[n].ndim <= 1 or n.endswith('.bias')]
    decay = [n for n in names if n not in no_decay]
    opt = _stepped([{'params': [params[n] for n in no_decay], 'weight_decay': 0.},
                    {'params': [params[n] for n in decay], 'weight_decay': 0.05}], mim)
    args = argparse.Namespace(model='MIM_vit_tiny_patch16', input_size=32, batch_size=4, epochs=4, warmup_epochs=1,
                              blr=1e-3, lr=1.6e-5, min_lr=0.0, weight_decay=0.05, mask_ratio=0.75, hog_nbins=9,
                              hog_bias=hasattr(mim.hog, 'bias') and mim.hog.bias is not None, accum_iter=1)
    return dict(model=ref_model_state(mim), optimizer=opt.state_dict(), epoch=epoch, scaler={}, args=args)


def vitfreeze_checkpoint(mim, frozen_layers: int, epoch: int = 0) -> Tuple[dict, torch.optim.AdamW, List[str]]:
    """ViTFreeze's save_model after ``frozen_layers`` FreezeOut layers froze (embed + blocks 0..frozen_layers-2):
    per-parameter groups, those of frozen layers and their state deleted, the stages of frozen blocks deleted from
    the model and the rest renumbered. Also returns the optimizer and the reference order of the kept groups."""
    stage_blocks = list(mim.stage_blocks)
    params = dict(mim.named_parameters())

    def layer(n: str) -> Optional[int]:
        if n.startswith('patch_embed.'):
            return 0
        m = re.match(r'^blocks\.(\d+)\.', n)
        if m:
            return int(m.group(1)) + 1
        m = re.match(r'^(?:norm|decoder)\.(\d+)\.', n)
        return stage_blocks[int(m.group(1))] + 1 if m else None

    names = [k for k in ref_model_state(mim) if not REF_FIXED.match(k)]
    order = [n for n in names if layer(n) is not None] + [n for n in names if layer(n) is None]
    groups = [dict(params=[params[n]], lr=1e-3, weight_decay=0. if params[n].ndim <= 1 or n.endswith('.bias')
                   else 0.05, **({} if layer(n) is None else {'layer_index': layer(n)})) for n in order]
    opt = _stepped(groups, mim)
    for i in reversed(range(len(opt.param_groups))):  # remove_param_from_optimizer_and_grad_comp
        g = opt.param_groups[i]
        if g.get('layer_index', 1 << 30) < frozen_layers:
            for p in g['params']:
                p.requires_grad = False
                opt.state.pop(p, None)
            del opt.param_groups[i]
    removed = sum(1 for b in stage_blocks if b + 1 < frozen_layers)  # update_forward_freezeout
    args = argparse.Namespace(model='MIM_vit_tiny_patch16', input_size=32, batch_size=4, epochs=20,
                              warmup_epochs=1, blr=1e-3, lr=1.6e-5, min_lr=0.0, weight_decay=0.05, hog_nbins=9,
                              hog_bias=False, how_scale='cubic', t_0=0.8, all_stages=False, dont_freeze_pe=False,
                              non_layerwise_lr=False, default_optimizer_debug=False, accum_iter=1)
    ckpt = dict(model=ref_model_state(mim, removed), optimizer=opt.state_dict(), epoch=epoch, scaler={}, args=args)
    return ckpt, opt, [n for n in order if layer(n) is None or layer(n) >= frozen_layers]


# ---- the layout itself (what the seed's log shows) -------------------------------------------------------------

def test_frozen_vitfreeze_checkpoint_has_the_seed_logs_stage_keys():
    mim = trained_mim()
    ckpt, _, _ = vitfreeze_checkpoint(mim, frozen_layers=5)  # embed + blocks 0-3: stages of blocks 1, 3, 3 gone
    stage_keys = {re.sub(r'\.(weight|bias)$', '', k) for k in ckpt['model'] if k.startswith(('norm.', 'hog_enc.'))}
    assert stage_keys == {'norm.0', 'hog_enc.0.conv'}
    assert {k.split('.')[1] for k in ckpt['model'] if k.startswith('decoder.')} == {'0'}
    assert 'decoder.0.pred.1.weight' in ckpt['model'] and 'decoder.0.pred.0.weight' not in ckpt['model']  # scale 0.5
    assert torch.equal(ckpt['model']['norm.0.weight'], mim.norm[3].weight)


# ---- evaluators: the deepest stage norm, and they say which ------------------------------------------------------

@pytest.fixture(scope='module')
def foreign(tmp_path_factory):
    from util.demo_data import make_demo_dataset
    root = tmp_path_factory.mktemp('foreign')
    data = make_demo_dataset(root / 'data', num_classes=2, train_per_class=4, val_per_class=2, size=32, seed=0)
    mim = trained_mim()
    paths = {}
    torch.save(localmim_checkpoint(mim), root / 'localmim.pth')
    paths['localmim'] = root / 'localmim.pth'
    torch.save(vitfreeze_checkpoint(trained_mim(), frozen_layers=5)[0], root / 'vitfreeze.pth')
    paths['vitfreeze'] = root / 'vitfreeze.pth'
    return dict(root=root, data=data, paths=paths, last_norm=mim.norm[3].weight.detach().clone(),
                last_bias=mim.norm[3].bias.detach().clone())


NOTE = {'localmim': 'stage norm norm.3 (after the last block) loaded as the final norm\n',
        'vitfreeze': 'stage norm norm.0 (after the last block) loaded as the final norm; 3 of the 4 stages have no '
                     'norm, decoder or HOG layer here (ViTFreeze removes those of stages that froze and renumbers '
                     'the rest), so norm.0 is stage 4 of 4\n'}


@pytest.mark.parametrize('fmt', ['localmim', 'vitfreeze'])
def test_load_pretrained_uses_the_deepest_stage_norm(foreign, fmt):
    import checkpoint_formats
    import models_vit
    model = models_vit.create_model('vit_tiny_patch16', **ARCH, num_classes=0, global_pool='token')
    report, _ = checkpoint_formats.load_pretrained(model, str(foreign['paths'][fmt]), verbose=False)
    assert report.final_norm == ('norm.3' if fmt == 'localmim' else 'norm.0')
    assert NOTE[fmt].strip() in report.notes
    assert torch.equal(model.norm.weight, foreign['last_norm']) and torch.equal(model.norm.bias, foreign['last_bias'])
    assert sorted(report.missing) == [] and not any(k.startswith('blocks.') for k in report.ignored)


def _eval_argv(consumer: str, foreign: dict, fmt: str, out: Path) -> List[str]:
    ckpt = str(foreign['paths'][fmt])
    if consumer == 'export':
        return ['--checkpoint', ckpt, '--output', str(out / 'enc.pth'), '--num_heads', '4']
    common = ['--finetune', ckpt, '--model', 'vit_tiny_patch16', *FLAGS, '--data_path', str(foreign['data']),
              '--device', 'cpu', '--num_workers', '0', '--batch_size', '4']
    if consumer == 'knn':
        return [*common, '--nb_knn', '2', '--output_dir', '']
    return [*common, '--epochs', '1', '--warmup_epochs', '0', '--output_dir', str(out),
            *(['--cls_token'] if consumer == 'finetune' else [])]


@pytest.mark.parametrize('fmt', ['localmim', 'vitfreeze'])
@pytest.mark.parametrize('consumer', ['knn', 'linprobe', 'finetune', 'export'])
def test_every_evaluator_reads_it_with_the_deepest_norm_and_says_so(foreign, fmt, consumer, tmp_path):
    script = {'knn': 'run_knn.py', 'linprobe': 'run_linprobe.py', 'finetune': 'run_finetune.py',
              'export': 'tools.export'}[consumer]
    rc, out, err = cli(script, _eval_argv(consumer, foreign, fmt, tmp_path))
    assert rc == 0 and 'Traceback' not in err, (rc, out[-2000:], err[-2000:])
    assert f'  {NOTE[fmt]}' in out, out[-3000:]
    if consumer == 'export':  # the timm state dict's final norm is that stage norm
        sd = torch.load(tmp_path / 'enc.pth', weights_only=True)
        assert torch.equal(sd['norm.weight'], foreign['last_norm']) and torch.equal(sd['norm.bias'],
                                                                                    foreign['last_bias'])
    if consumer == 'linprobe':  # the probe trains only its head: the saved encoder norm is the loaded one
        sd = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['model']
        assert torch.equal(sd['encoder.norm.weight'], foreign['last_norm'])


def test_global_pool_fine_tuning_says_the_stage_norm_is_not_used(foreign, tmp_path):
    argv = [a for a in _eval_argv('finetune', foreign, 'vitfreeze', tmp_path) if a != '--cls_token']
    rc, out, err = cli('run_finetune.py', argv)
    assert rc == 0, err[-2000:]
    assert '  global pool: stage norm norm.0 (after the last block) not used, fc_norm starts fresh (MAE convention); ' \
           '3 of the 4 stages have no norm' in out


# ---- --resume in run_pretrain.py -------------------------------------------------------------------------------

def _optimizer_by_name(model, opt) -> Dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: opt.state[p] for g in opt.param_groups for p in g['params'] if p in opt.state}


@pytest.mark.parametrize('hog_bias', [False, True])
def test_localmim_checkpoint_continues_model_and_optimizer(hog_bias):
    from timm.optim import param_groups_weight_decay
    from checkpoint_formats import adopt_reference_pretrain
    src = trained_mim(hog_bias)
    ckpt = localmim_checkpoint(src, epoch=3)
    want = {n: p.detach().clone() for n, p in src.state_dict().items()}
    want_opt = {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                for n, st in _optimizer_by_name(src, _rebuild_localmim_opt(src, ckpt)).items()}
    dst = trained_mim(hog_bias, seed=1)
    opt = torch.optim.AdamW(param_groups_weight_decay(dst, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=True)
    out = adopt_reference_pretrain('x.pth', ckpt, dst, opt, None, steps_per_epoch=5)
    dst.load_state_dict(out['model'])  # strict
    opt.load_state_dict(out['optimizer'])
    assert out['epoch'] == 3 and out['freezeout'] == {} and out['args']['model'] == 'MIM_vit_tiny_patch16'
    for k, v in dst.state_dict().items():
        assert torch.equal(v, want[k]), k
    got = _optimizer_by_name(dst, opt)
    assert set(got) == set(want_opt) == {n for n, p in dst.named_parameters() if p.requires_grad}
    for n, st in want_opt.items():
        assert torch.equal(got[n]['exp_avg'], st['exp_avg']) and torch.equal(got[n]['exp_avg_sq'], st['exp_avg_sq'])
        assert float(got[n]['step']) == float(st['step']) == 2.0


def _rebuild_localmim_opt(mim, ckpt) -> torch.optim.AdamW:
    """The source optimizer, restored from the checkpoint onto ``mim`` in the reference's group order."""
    params = dict(mim.named_parameters())
    names = [_ours(k, 0) for k in ckpt['model'] if not REF_FIXED.match(k)]
    no_decay = [n for n in names if params[n].ndim <= 1 or n.endswith('.bias')]
    decay = [n for n in names if n not in no_decay]
    opt = torch.optim.AdamW([{'params': [params[n] for n in no_decay]}, {'params': [params[n] for n in decay]}])
    opt.load_state_dict(ckpt['optimizer'])
    return opt


def _schedule_freezer(model, spe: int, epochs: int = 20):
    """The FreezeOut run_pretrain.py builds for --how_scale cubic --t_0 0.8 (warm-up 1 epoch, T = epochs x spe)."""
    from freezeout import FreezeOut, FreezeOutSchedule
    schedule = FreezeOutSchedule(FreezeOut.unit_names(model, False), spe * epochs, spe, 1e-3, 0.0, 0.8, 'cubic')
    return FreezeOut(model, schedule)


def test_frozen_vitfreeze_checkpoint_continues_with_the_schedules_freeze_state(capsys):
    """Everything that still trains continues; the cls token, which ViTFreeze trains to the end but which freezes
    with unit 0 here (docs/DESIGN.md), loses its AdamW state, and the message says so."""
    src = trained_mim()
    spe = 10
    probe = _schedule_freezer(trained_mim(seed=2), spe)
    epoch = next(e for e in range(20) if probe.num_frozen_at((e + 1) * spe) == 5)  # embed + blocks 0-3 frozen
    ckpt, src_opt, kept = vitfreeze_checkpoint(src, frozen_layers=5, epoch=epoch)
    want = {n: p.detach().clone() for n, p in src.state_dict().items()}
    want_opt = {n: {k: v.clone() for k, v in st.items()} for n, st in _optimizer_by_name(src, src_opt).items()}
    dst = trained_mim(seed=1)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    freezer = _schedule_freezer(dst, spe)
    opt = torch.optim.AdamW(freezer.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95), fused=True)
    from checkpoint_formats import adopt_reference_pretrain
    out = adopt_reference_pretrain('x.pth', ckpt, dst, opt, freezer, spe)
    assert out['freezeout'] == freezer.state_dict() and out['freezeout']['num_frozen'] == 5
    assert freezer.num_frozen == 5 and out['epoch'] == epoch
    freezer.load_state_dict(out['freezeout'], opt)  # what run_pretrain.py does next: idempotent
    dst.load_state_dict(out['model'])
    opt.load_state_dict(out['optimizer'])
    for k, v in dst.state_dict().items():
        if k.startswith(('norm.0.', 'norm.1.', 'norm.2.', 'decoder.0.', 'decoder.1.', 'decoder.2.')):
            assert torch.equal(v, fresh[k]), k  # removed stages: this model's init (they stay off)
        else:
            assert torch.equal(v, want[k]), k
    assert torch.equal(dst.norm[3].weight, src.norm[3].weight) and dst.active_stages() == [3]
    got = _optimizer_by_name(dst, opt)
    trainable = {n for n, p in dst.named_parameters() if p.requires_grad}
    assert set(got) == trainable == set(want_opt) - {'cls_token'} == set(kept) - {'cls_token'}
    assert all(n.startswith(('blocks.4.', 'blocks.5.', 'norm.3.', 'decoder.3.')) for n in trainable)
    assert 'frozen here but trained there: cls_token (state dropped)' in capsys.readouterr().out
    for n in trainable:
        st = want_opt[n]
        assert torch.equal(got[n]['exp_avg'], st['exp_avg']) and torch.equal(got[n]['exp_avg_sq'], st['exp_avg_sq'])


def _refusal(ckpt, freezer_fn=None, spe: int = 10) -> str:
    from timm.optim import param_groups_weight_decay
    from checkpoint_formats import adopt_reference_pretrain
    from util.errors import UserError
    dst = trained_mim(seed=1)
    freezer = freezer_fn(dst) if freezer_fn else None
    opt = torch.optim.AdamW(freezer.param_groups(0.05) if freezer else param_groups_weight_decay(dst, 0.05))
    with pytest.raises(UserError) as e:
        adopt_reference_pretrain('x.pth', ckpt, dst, opt, freezer, spe)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('--resume x.pth: this ')
    return msg


def test_refusals_name_what_is_missing():
    ckpt, _, _ = vitfreeze_checkpoint(trained_mim(), frozen_layers=5, epoch=12)
    assert re.search(r'ViTFreeze pre-training checkpoint cannot be continued here: it had 5 frozen FreezeOut units '
                     r'after epoch 12, these flags freeze 0 by optimizer step 130; resume with the schedule of that '
                     r'run \(its args: --how_scale cubic --t_0 0.8\)$', _refusal(ckpt))
    wrong = _refusal(ckpt, lambda m: _schedule_freezer(m, 10), spe=1)  # step 13: earlier in the schedule
    assert 'it had 5 frozen FreezeOut units after epoch 12, these flags freeze' in wrong
    released = {'model': ref_model_state(trained_mim())}
    assert _refusal(released).endswith('it has no optimizer and no epoch (a released model, not a training '
                                       'checkpoint); evaluate it with --finetune x.pth in run_knn.py / '
                                       'run_linprobe.py / run_finetune.py')
    assert 'LocalMIM pre-training checkpoint' in _refusal(released)
    bias = localmim_checkpoint(trained_mim(hog_bias=True))
    assert _refusal(bias).endswith('it was trained with --hog_bias; resume with it')
    stale = localmim_checkpoint(trained_mim())  # a 2-group optimizer that does not fit the model
    stale['optimizer']['param_groups'][1]['params'] = stale['optimizer']['param_groups'][1]['params'][:-1]
    assert 'cannot be matched by name' in _refusal(stale)


def test_run_pretrain_resume(tmp_path):
    """The real command line: a LocalMIM checkpoint continues (one more epoch), a frozen ViTFreeze one without the
    schedule flags stops in one line, exit 2, nothing written."""
    from util.demo_data import make_demo_dataset
    data = make_demo_dataset(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=2, size=32, seed=0)
    mim = trained_mim()
    torch.save(localmim_checkpoint(mim, epoch=0), tmp_path / 'localmim.pth')
    base = ['--model', 'MIM_vit_tiny_patch16', *FLAGS, '--decoder_embed_dim', '32', '--batch_size', '4',
            '--num_workers', '0', '--device', 'cpu', '--data_path', str(data), '--epochs', '2', '--warmup_epochs',
            '1', '--vis_freq', '0']
    rc, out, err = cli('run_pretrain.py', [*base, '--resume', str(tmp_path / 'localmim.pth'), '--output_dir',
                                           str(tmp_path / 'out')])
    assert rc == 0, err[-3000:]
    assert 'LocalMIM pre-training checkpoint (epoch 0) continued in this layout' in out
    assert 'Start training for 2 epochs (from epoch 1)' in out and 'epoch 1: loss' in out
    torch.save(vitfreeze_checkpoint(trained_mim(), frozen_layers=5, epoch=0)[0], tmp_path / 'vitfreeze.pth')
    rc, out, err = cli('run_pretrain.py', [*base, '--resume', str(tmp_path / 'vitfreeze.pth'), '--output_dir',
                                           str(tmp_path / 'out2')])
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f'error: --resume {tmp_path / "vitfreeze.pth"}: this '
                                                               'ViTFreeze pre-training checkpoint'), err
    assert not (tmp_path / 'out2').exists() or not any((tmp_path / 'out2').glob('checkpoint-*'))
