"""Self-distillation across stages (--self_distill W, --distill_ema M; self_distill.SelfDistill): off by default
and bit-identical, the loss against an independent full-decode reference, no gradient through the teacher, the
EMA update formula and its copy of frozen weights, the FLOP model's teacher pass against the matmul formula, a
frozen stage's term skipped, and through the CLI: train_distill_loss in log.txt and TensorBoard, the EMA in the
checkpoint and an exact resume, the plan text, one-line errors."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from cli_inproc import cli, resume_from_epoch0
from conftest import TINY_PRETRAIN_FLAGS
from freezeout import measure_unit_flops, step_cost
from models_mim import create_model
from self_distill import encoder_taps, teacher_blocks
from util.errors import UserError

pytestmark = pytest.mark.usefixtures('single_thread')

D, DEC = 32, 16


def tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault('stage_taps', '1,2,3,4')
    kw.setdefault('tap_scales', '4,2,1,0.5')
    return create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=D, depth=4, num_heads=2,
                        decoder_embed_dim=DEC, **kw)


def imgs(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def reference_distill(model, x, seed, teacher=None):
    """Independent computation: full decode of every stage, teacher by a hand loop over the blocks, MSE over the
    positions the mask removed (in position order, not the masked path's)."""
    teacher = model if teacher is None else teacher
    torch.manual_seed(seed)
    model.compute_targets(x, model.active_stages())  # no RNG, but keep the call order of forward
    latents, mask, ids = model.forward_encoder(x, 0.75)
    with torch.no_grad():
        t = teacher.patch_embed(x) + teacher.pos_embed[:, 1:]
        t = torch.cat([(teacher.cls_token + teacher.pos_embed[:, :1]).expand(x.shape[0], -1, -1), t], 1)
        feats = []
        for blk in teacher.blocks:
            t = blk(t)
            feats.append(F.layer_norm(t[:, 1:], (D,)))
    total = 0.0
    sel = mask.bool()
    for k, tb in teacher_blocks(model.stage_blocks).items():
        if k not in latents:
            continue
        _, tok = model.decoder[k](latents[k], ids, return_tokens=True)
        pred = model.decoder[k].distill_head(tok)
        total = total + (pred - feats[tb]).pow(2).mean(-1)[sel].mean()
    return total


def test_off_by_default_and_bit_identical():
    ref, off = tiny(), tiny(self_distill=0.0)
    assert off.self_distill is None and off.optimizer_step_hook is None and off.checkpoint_extras() == {}
    assert list(ref.state_dict()) == list(off.state_dict())
    x = imgs()
    outs = []
    for m in (ref, off):
        m.train()
        torch.manual_seed(3)
        outs.append(m(x))
    assert 'distill_loss' not in outs[1] and torch.equal(outs[0]['loss'], outs[1]['loss'])
    # the CLI defaults are "off"
    import run_pretrain
    args = run_pretrain.get_args_parser().parse_args([])
    assert args.self_distill == 0.0 and args.distill_ema is None
    # on: the rest of the model is initialised exactly as without it (the heads draw last)
    on = tiny(self_distill=1.0)
    sd_on = on.state_dict()
    assert all(torch.equal(v, sd_on[k]) for k, v in ref.state_dict().items())
    assert sorted(set(sd_on) - set(ref.state_dict())) == [f'decoder.{k}.distill_head.{p}' for k in range(3)
                                                          for p in ('bias', 'weight')]


def test_loss_matches_reference_and_shapes():
    m = tiny(self_distill=0.5)
    base = tiny()
    m.train(), base.train()
    assert m.self_distill.teacher_of == {0: 1, 1: 2, 2: 3}  # stage k <- the next tap; the deepest has none
    assert m.decoder[0].distill_head.weight.shape == (D, DEC) and not hasattr(m.decoder[3], 'distill_head')
    x = imgs()
    torch.manual_seed(11)
    out = m(x)
    torch.manual_seed(11)
    b = base(x)
    ref = reference_distill(m, x, 11)
    assert out['distill_loss'].shape == () and out['distill_loss'].item() > 0
    assert torch.allclose(out['distill_loss'], ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out['loss'], b['loss'] + 0.5 * ref, rtol=1e-5, atol=1e-6)
    m.eval()
    torch.manual_seed(11)
    assert 'distill_loss' not in m(x)  # a training term only (FLOPs counted apart, see the FLOP test)


def test_repeated_taps_pick_the_next_deeper_one():
    assert teacher_blocks([1, 3, 1, 3]) == {0: 3, 2: 3}
    assert teacher_blocks([1, 3, 9, 11]) == {0: 3, 1: 9, 2: 11}


def test_no_gradient_through_the_teacher():
    m = tiny(self_distill=1.0)
    m.train()
    x = imgs()
    torch.manual_seed(2)
    m(x)['loss'].backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert all(got[f'decoder.{k}.distill_head.weight'].abs().sum() > 0 for k in range(3))
    m.zero_grad(set_to_none=True)
    # reference: the teacher from a detached copy, so no gradient can reach the model through it
    frozen_copy = copy.deepcopy(m)
    torch.manual_seed(2)
    base = m.total_loss(m(x)['stage_losses'], x)
    (base + reference_distill(m, x, 2, teacher=frozen_copy)).backward()
    want = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in got:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6), n


def test_ema_update_formula_frozen_copy_and_teacher():
    m = tiny(self_distill=1.0, distill_ema=0.9)
    ema = m.self_distill.ema
    names = {n for n, _ in m.named_parameters()}
    assert not any(p is q for p in ema.parameters() for q in m.parameters())
    assert 'distill_ema' not in ''.join(m.state_dict()) and all(not p.requires_grad for p in ema.parameters())
    assert {n for n, _ in ema.named_parameters()} <= names
    before = {n: p.detach().clone() for n, p in ema.named_parameters()}
    live = dict(m.named_parameters())
    for p in m.blocks[0].parameters():
        p.requires_grad_(False)  # as a frozen unit
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.25)  # "an optimizer step"
    m.optimizer_step_hook()
    for n, e in ema.named_parameters():
        if live[n].requires_grad:
            assert torch.allclose(e, 0.9 * before[n] + 0.1 * live[n], rtol=0, atol=1e-6), n
        else:  # frozen blocks and the fixed pos embed: the weight itself
            assert torch.equal(e, live[n]), n
    # the EMA, not the live encoder, is the teacher
    m.train()
    x = imgs()
    torch.manual_seed(4)
    out = m(x)
    assert torch.allclose(out['distill_loss'], reference_distill(m, x, 4, teacher=ema), rtol=1e-5)
    assert all(p.grad is None for p in ema.parameters())
    # checkpoint round trip
    extras = m.checkpoint_extras()
    other = tiny(self_distill=1.0, distill_ema=0.9)
    other.load_checkpoint_extras(extras, 'ckpt')
    assert all(torch.equal(a, b) for a, b in zip(other.self_distill.ema.state_dict().values(),
                                                 ema.state_dict().values()))
    with pytest.raises(UserError, match='ckpt: the checkpoint has no distill_ema'):
        other.load_checkpoint_extras({}, 'ckpt')


def test_frozen_stage_drops_its_term():
    m = tiny(self_distill=1.0)
    m.train()
    m.set_frozen(3, embed_frozen=True)  # blocks 1-3 frozen: only stage 3 (no term) is active
    calls = []
    import self_distill
    orig = self_distill.encoder_taps
    self_distill.encoder_taps = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        torch.manual_seed(1)
        out = m(imgs())
    finally:
        self_distill.encoder_taps = orig
    assert calls == [] and out['distill_loss'].item() == 0.0
    m.set_frozen(1, embed_frozen=True)  # stages 1, 2 still distilled
    torch.manual_seed(1)
    assert m(imgs())['distill_loss'].item() > 0


def test_flop_model_counts_the_teacher_pass():
    m0, m = tiny(), tiny(self_distill=1.0)
    f0 = measure_unit_flops(m0, 32, 0.75, torch.device('cpu'), time_targets=False)
    f = measure_unit_flops(m, 32, 0.75, torch.device('cpu'), time_targets=False)
    L, N, p = 64, 65, 4
    # matmuls, 2 FLOPs per multiply-add: patch embed conv, then per block qkv, q@k, attn@v, proj, 2 MLP layers
    block = 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D + 2 * 2 * N * D * 4 * D
    teacher = 2 * L * 3 * p * p * D + 4 * block  # up to the deepest teacher tap: block 4
    assert f['nograd_fwd'] == [[3, pytest.approx(teacher)]]  # tied to the deepest distilled stage: unit block3
    M = L - int(L * 0.25)
    heads = [0.0] + [2.0 * M * DEC * D] * 3 + [0.0]  # one head per distilled stage, in its block's unit
    assert [a - b for a, b in zip(f['unit_fwd'], f0['unit_fwd'])] == pytest.approx(heads)
    for n in range(6):  # the teacher is paid while unit 3 (block3) trains: frozen counts 0..3
        extra = step_cost(f, n, False) - step_cost({**f, 'nograd_fwd': []}, n, False)
        assert extra == pytest.approx(teacher if n <= 3 else 0.0)
    assert 'nograd_fwd' not in f0


def _args(demo_root, out, *extra):
    # 32 images, batch 8: 4 optimizer steps per epoch
    return [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root, '--output_dir', out, '--save_freq', '1',
            '--vis_freq', '0', *extra]


def test_plan_only_shows_the_teacher_pass(demo_root):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, '', '--epochs', '2', '--plan_only', '--self_distill',
                                                '1', '--t_0', '0.8', '--how_scale', 'cubic'))
    assert rc == 0, err
    assert 'self-distillation: weight 1 per stage term, teacher live encoder (no_grad)' in out
    assert 'teacher pass ' in out and 'GFLOP/img forward, no backward, paid until block2 freezes' in out  # default depth-4 taps 2,4,2,4


def test_cli_logs_distill_loss_and_saves_the_ema(demo_root, tmp_path):
    out_dir = tmp_path / 'o'
    rc, out, err = cli('run_pretrain.py', _args(demo_root, out_dir, '--epochs', '1', '--self_distill', '1',
                                                '--distill_ema', '0.9', '--log_dir', out_dir / 'tb'))
    assert rc == 0, err[-3000:]
    rec = json.loads((out_dir / 'log.txt').read_text().splitlines()[0])
    assert rec['train_distill_loss'] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out_dir / 'tb')).Reload()
    assert len(ea.Scalars('train_distill_loss')) == 4  # one per optimizer step
    ck = torch.load(out_dir / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    ema = ck['distill_ema']
    assert set(ema) >= {'cls_token', 'patch_embed.proj.weight', 'blocks.3.mlp.fc2.weight'}
    # 4 steps of M = 0.9 moved the EMA toward the weights but not onto them
    w, e = ck['model']['blocks.0.attn.qkv.weight'], ema['blocks.0.attn.qkv.weight']
    assert not torch.equal(w, e) and 'distill' not in ''.join(ck['model']).replace('distill_head', '')


@pytest.mark.slow
def test_cli_resume_with_ema_is_exact(demo_root, tmp_path):
    flags = ['--epochs', '2', '--self_distill', '1', '--distill_ema', '0.9']
    ref, res = tmp_path / 'ref', tmp_path / 'res'
    rc, out, err = cli('run_pretrain.py', _args(demo_root, ref, *flags))
    assert rc == 0, err[-3000:]
    a, b, ra, rb = resume_from_epoch0('run_pretrain.py', ref, res, lambda d: _args(demo_root, d, *flags))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert all(torch.equal(a['distill_ema'][k], b['distill_ema'][k]) for k in a['distill_ema'])
    keep = ('train_loss', 'train_distill_loss', 'step')
    assert [{k: r[k] for k in keep} for r in ra] == [{k: r[k] for k in keep} for r in rb]


@pytest.mark.parametrize('extra,msg', [
    (['--self_distill', '-1'], 'error: --self_distill -1.0: must be'),
    (['--self_distill', '1', '--distill_ema', '1'], 'error: --distill_ema 1.0: must be'),
    (['--self_distill', '1', '--distill_ema', '0'], 'error: --distill_ema 0.0: must be'),
    (['--distill_ema', '0.9'], 'error: --distill_ema 0.9: needs --self_distill W > 0'),
    (['--self_distill', '1', '--stage_taps', '4'], 'error: --self_distill 1: needs at least two stage taps'),
])
def test_cli_errors_are_one_line(demo_root, tmp_path, extra, msg):
    rc, out, err = cli('run_pretrain.py', _args(demo_root, tmp_path / 'o', '--epochs', '1', *extra))
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(msg), err
    assert not (tmp_path / 'o').exists()


def test_model_level_errors():
    with pytest.raises(UserError, match='--self_distill -0.5: the weight must be finite and >= 0'):
        tiny(self_distill=-0.5)
    with pytest.raises(UserError, match=r'--distill_ema 1.5: must be in \(0, 1\)'):
        tiny(self_distill=1.0, distill_ema=1.5)


def test_encoder_taps_is_layer_normed_without_affine():
    m = tiny()
    x = imgs()
    t = encoder_taps(m, x, [0, 2])
    assert set(t) == {0, 2} and t[2].shape == (2, 64, D)
    assert torch.allclose(t[2].mean(-1), torch.zeros(2, 64), atol=1e-5)
    assert torch.allclose(t[2].var(-1, unbiased=False), torch.ones(2, 64), atol=1e-3)


@pytest.mark.slow
def test_ddp_two_ranks_with_freezeout_and_ema(demo_root, tmp_path):
    """gloo, 2 ranks, FreezeOut freezing the distilled stages mid-run: every trained head gets its gradient each
    step (no unused-parameter failure in the reducer, rebuilt at each freeze) and the run ends with the terms
    switched off (the default depth-4 taps 2,4,2,4: stages 0 and 2 are distilled from block 4 and freeze with
    block 2)."""
    import subprocess
    import sys
    from reliability_common import free_port
    from cli_inproc import REPO
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           str(REPO / 'run_pretrain.py'), *map(str, _args(demo_root, out, '--epochs', '2', '--self_distill', '1',
                                                           '--distill_ema', '0.9', '--batch_size', '4', '--t_0',
                                                           '0.5', '--how_scale', 'linear'))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    recs = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines()]
    assert len(recs) == 2 and recs[0]['train_distill_loss'] > 0 and recs[-1]['frozen_units'] == 3
    assert recs[-1]['active_stages'] == [1, 3]  # the distilled stages 0, 2 (block 2) went with their block
    ck = torch.load(out / 'checkpoint-last.pth', map_location='cpu', weights_only=True)
    assert 'distill_ema' in ck


def test_ema_update_walks_the_model_once_not_every_step():
    # the EMA update runs after every optimizer step: the (EMA, live) parameter pairs are found once, and a freeze
    # between steps is still seen (requires_grad is read each step)
    m = tiny(self_distill=1.0, distill_ema=0.5)
    calls = []
    orig = m.named_parameters
    m.named_parameters = lambda *a, **k: calls.append(1) or orig(*a, **k)
    hook = m.optimizer_step_hook
    for _ in range(3):
        hook()
    assert len(calls) == 1
    ema = dict(m.self_distill.ema.named_parameters())
    with torch.no_grad():
        for p in m.blocks[1].parameters():
            p.requires_grad_(False)
            p.add_(1.0)
    hook()
    assert all(torch.equal(ema[f'blocks.1.{n}'], p) for n, p in m.blocks[1].named_parameters())
