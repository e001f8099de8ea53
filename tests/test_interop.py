"""Checkpoint format x consumer interoperability matrix (issue 15), through the real command lines.

Every checkpoint format a researcher may hold is built here from tiny models (no external files), at a standard
preset size (ViT-Ti/16: width 192, depth 12, 3 heads) and at a size no preset has (patch 4, width 64, depth 4,
2 heads), both at 32 px; each is then given to every consumer (``run_finetune.py --finetune``, ``run_linprobe.py
--finetune``, ``run_knn.py --finetune``, ``tools/export.py --checkpoint``), once with no architecture flag at all
and once with ``--model`` (plus, at the non-standard size, every shape flag). Each cell must either run, printing one
``architecture:`` line that says where each number came from (typed, tensor shapes, checkpoint args, export
recipe, width preset), or stop with exit 2 and one ``error:`` line naming the flag to pass. No traceback anywhere.

The cells run the scripts' ``__main__`` (``runpy.run_path``: argument parsing, ``run_main``'s error handling and
all) inside one process, to spare 128 interpreter + torch start-ups; ``test_issue_reproduction_subprocess`` runs
the issue's own command line as a real subprocess.

``python tests/test_interop.py --table`` prints the matrix (markdown), as in the README.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / 'tests')) if p not in sys.path]
from cli_inproc import cli  # noqa: E402

SIZES = {
    'preset': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, input_size=32),  # ViT-Ti/16
    'custom': dict(patch_size=4, embed_dim=64, depth=4, num_heads=2, input_size=32),     # no preset has width 64
}
FORMATS = ('pretrain', 'pretrain_freezeout', 'finetune', 'linprobe', 'timm_export', 'released_encoder',
           'released_full', 'mae_train')
FORMAT_DOC = {
    'pretrain': 'ours: run_pretrain.py checkpoint (args dict, optimizer, rng)',
    'pretrain_freezeout': 'ours: run_pretrain.py with FreezeOut (units frozen, freezeout state)',
    'finetune': 'ours: run_finetune.py checkpoint (avg pool, fc_norm, head)',
    'linprobe': 'ours: run_linprobe.py checkpoint (encoder.* + BN/Linear head)',
    'timm_export': 'ours: tools/export.py output (raw timm state dict + .json recipe)',
    'released_encoder': "MAE/LocalMIM released, encoder only: {'model': ...}, no args",
    'released_full': "LocalMIM released with decoders: {'model': ...}, no args",
    'mae_train': 'MAE training checkpoint: args as a pickled argparse.Namespace',
}
CONSUMERS = ('finetune', 'linprobe', 'knn', 'export')
VARIANTS = ('inferred', 'typed')  # no architecture flag / --model (+ every shape flag at the custom size)
NO_ARGS = ('released_encoder', 'released_full', 'mae_train')  # nothing records the head count of a custom width


def expected(fmt: str, size: str, variant: str) -> str:
    """'ok', or the regex of the one error line."""
    if size == 'custom' and variant == 'inferred' and fmt in NO_ARGS:
        return r'^error: .*the number of attention heads is not recorded and width 64 is no standard ViT.*; pass ' \
               r'--num_heads'
    return 'ok'


# ---- building the formats -------------------------------------------------------------------------------------


def _mim(size: str):
    import models_mim
    s = SIZES[size]
    torch.manual_seed(0)
    return models_mim.create_model('MIM_vit_tiny_patch16', img_size=s['input_size'], patch_size=s['patch_size'],
                                   embed_dim=s['embed_dim'], depth=s['depth'], num_heads=s['num_heads'])


def _flags(size: str) -> List[str]:
    s = SIZES[size]
    return ['--input_size', str(s['input_size']), '--patch_size', str(s['patch_size']), '--embed_dim',
            str(s['embed_dim']), '--depth', str(s['depth']), '--num_heads', str(s['num_heads'])]


def _ours(module, argv: List[str], out: Path, state: Dict, name: str) -> Path:
    """A checkpoint exactly as our scripts write it (util.checkpoint.save_checkpoint with the script's args)."""
    from util.checkpoint import save_checkpoint
    args = module.get_args_parser().parse_args(argv)
    d = out / f'.{name}'
    d.mkdir()
    (path,) = save_checkpoint(str(d), 0, state, args, numbered=False)
    os.replace(path, out / f'{name}.pth')
    d.rmdir()
    return out / f'{name}.pth'


def build_formats(size: str, out: Path) -> Dict[str, Path]:
    import checkpoint_formats
    import models_vit
    import run_finetune
    import run_linprobe
    import run_pretrain
    from freezeout import FreezeOut, FreezeOutSchedule
    from tools.export import export_encoder
    out.mkdir(parents=True, exist_ok=True)
    mim = _mim(size)
    sd = mim.state_dict()
    paths: Dict[str, Path] = {}
    flags = ['--model', 'MIM_vit_tiny_patch16', *_flags(size)]
    opt = torch.optim.AdamW(mim.parameters())
    paths['pretrain'] = _ours(run_pretrain, flags, out, dict(model=sd, optimizer=opt.state_dict(), scaler=None, step=0,
                                                            freezeout={}), 'pretrain')
    fo = _mim(size)
    schedule = FreezeOutSchedule(FreezeOut.unit_names(fo, False), total_steps=10, warmup_steps=1, lr=1e-3,
                                 min_lr=0.0, t_0=0.3, how_scale='linear')
    freezer = FreezeOut(fo, schedule)
    fo_opt = torch.optim.AdamW(freezer.param_groups(0.05), lr=1e-3)
    freezer.step(fo_opt, 6)  # the embedding and the first blocks are frozen by now
    assert freezer.num_frozen >= 1
    paths['pretrain_freezeout'] = _ours(run_pretrain, [*flags, '--t_0', '0.3', '--how_scale', 'linear'], out, dict(
        model=fo.state_dict(), optimizer=fo_opt.state_dict(), scaler=None, step=6, freezeout=freezer.state_dict()),
        'pretrain_freezeout')
    vit = dict(img_size=SIZES[size]['input_size'], **{k: SIZES[size][k] for k in ('patch_size', 'embed_dim', 'depth',
                                                                                    'num_heads')})
    ft = models_vit.create_model('vit_tiny_patch16', num_classes=2, global_pool='avg', **vit)
    checkpoint_formats.load_encoder_state(ft, sd, verbose=False)
    paths['finetune'] = _ours(run_finetune, ['--model', 'vit_tiny_patch16', *_flags(size)], out, dict(
        model=ft.state_dict(), optimizer=torch.optim.AdamW(ft.parameters()).state_dict(), max_accuracy=50.0, step=2),
        'finetune')
    enc = models_vit.create_model('vit_tiny_patch16', num_classes=0, global_pool='token', **vit)
    checkpoint_formats.load_encoder_state(enc, sd, verbose=False)
    probe = run_linprobe.LinearProbe(enc, 2)
    paths['linprobe'] = _ours(run_linprobe, ['--model', 'vit_tiny_patch16', *_flags(size)], out, dict(
        model=probe.state_dict(), optimizer=torch.optim.SGD(probe.head.parameters(), lr=0.1).state_dict(),
        max_accuracy=50.0, step=2), 'linprobe')
    with contextlib.redirect_stdout(io.StringIO()):
        export_encoder(str(paths['pretrain']), str(out / 'timm_export.pth'))
    paths['timm_export'] = out / 'timm_export.pth'
    last = len(mim.norm) - 1
    encoder = {k: v for k, v in sd.items() if k.startswith(('cls_token', 'pos_embed', 'patch_embed.', 'blocks.'))}
    encoder.update({f'norm.{p}': sd[f'norm.{last}.{p}'] for p in ('weight', 'bias')})  # MAE's final norm
    torch.save({'model': encoder}, out / 'released_encoder.pth')
    paths['released_encoder'] = out / 'released_encoder.pth'
    torch.save({'model': sd}, out / 'released_full.pth')
    paths['released_full'] = out / 'released_full.pth'
    dim = SIZES[size]['embed_dim']
    mae_sd = dict(encoder, mask_token=torch.zeros(1, 1, 32), **{'decoder_embed.weight': torch.zeros(32, dim),
                                                               'decoder_pred.weight': torch.zeros(48, 32)})
    mae_args = argparse.Namespace(model='mae_vit_tiny_patch16', input_size=SIZES[size]['input_size'], batch_size=64,
                                  mask_ratio=0.75, norm_pix_loss=True, epochs=800)
    torch.save({'model': mae_sd, 'optimizer': {}, 'epoch': 0, 'scaler': {}, 'args': mae_args}, out / 'mae_train.pth')
    paths['mae_train'] = out / 'mae_train.pth'
    return paths


# ---- running a cell -------------------------------------------------------------------------------------------

SCRIPT = {'finetune': 'run_finetune.py', 'linprobe': 'run_linprobe.py', 'knn': 'run_knn.py',
          'export': 'tools.export'}


def cell_argv(consumer: str, ckpt: Path, size: str, variant: str, data: Path, tmp: Path) -> List[str]:
    typed: List[str] = []
    if variant == 'typed':
        typed = ['--model', 'vit_tiny_patch16']
        if size == 'custom':
            typed += ['--num_heads', str(SIZES[size]['num_heads'])] if consumer == 'export' else _flags(size)
    if consumer == 'export':
        return ['--checkpoint', str(ckpt), '--output', str(tmp / 'export.pth'), *typed]
    common = ['--finetune', str(ckpt), '--data_path', str(data), '--output_dir', '', '--device', 'cpu',
              '--num_workers', '0', '--batch_size', '4', *typed]
    if consumer == 'knn':
        return [*common, '--nb_knn', '2']
    return [*common, '--epochs', '1', '--warmup_epochs', '0']


ARCH_LINE = re.compile(r'^architecture: (.*)$', re.M)
ARCH_ITEM = re.compile(r'(\w+) (\S+) \(([^)]*)\)')
SUCCESS = {'finetune': r'^\* Acc@1 [\d.]+', 'linprobe': r'^\* Acc@1 [\d.]+', 'knn': r'^k-NN k=2: top-1 [\d.]+',
           'export': r'^wrote .*export\.pth and .*export\.pth\.json$'}


def run_cell(fmt: str, consumer: str, size: str, variant: str, paths: Dict[str, Path], data: Path, tmp: Path):
    tmp.mkdir(parents=True, exist_ok=True)
    rc, out, err = cli(SCRIPT[consumer], cell_argv(consumer, paths[fmt], size, variant, data, tmp))
    for f in tmp.iterdir():  # exports of ViT-Ti are 22 MB each
        f.unlink()
    return rc, out, err


def check_cell(fmt: str, consumer: str, size: str, variant: str, result) -> None:
    rc, out, err = result
    assert 'Traceback' not in out + err, (rc, err[-3000:])
    want = expected(fmt, size, variant)
    if want != 'ok':
        errors = [l for l in err.splitlines() if l.startswith('error')]
        assert rc == 2 and len(errors) == 1, (rc, err[-2000:])
        assert re.search(want, errors[0]), errors[0]
        assert errors[0] == [l for l in err.splitlines() if l.strip()][-1]
        return
    assert rc == 0, (rc, out[-2000:], err[-2000:])
    assert re.search(SUCCESS[consumer], out, re.M), out[-2000:]
    lines = ARCH_LINE.findall(out)
    assert len(lines) == 1, lines
    arch = {k: (v, src) for k, v, src in ARCH_ITEM.findall(lines[0])}
    assert set(arch) == {'model', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'input_size'}, lines[0]
    for k, v in SIZES[size].items():
        assert int(arch[k][0]) == v, (k, lines[0])
    typed = set()
    if variant == 'typed':
        typed = {'model'}
        if size == 'custom':
            typed |= {'num_heads'} if consumer == 'export' else set(SIZES[size])
    for k, (_, src) in arch.items():
        if k in typed:
            assert src == 'typed', (k, lines[0])
        elif k in ('patch_size', 'embed_dim', 'depth'):
            assert src == 'tensor shapes', (k, lines[0])  # the tensors are the truth for what they show
        elif k == 'input_size' and consumer != 'export':
            assert src in ('checkpoint args', 'export recipe', 'tensor shapes'), (k, lines[0])
        else:
            assert re.match(r'(checkpoint args|export recipe|tensor shapes|width \d+ = vit_)', src), (k, lines[0])


# ---- the matrix -----------------------------------------------------------------------------------------------

CELLS = [(f, c, s, v) for f in FORMATS for c in CONSUMERS for s in SIZES for v in VARIANTS]


@pytest.fixture(scope='module')
def matrix(tmp_path_factory) -> Dict[tuple, tuple]:
    """Every cell, run once (module-scoped: the parametrised test below only checks the results)."""
    from util.demo_data import make_demo_dataset
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp('interop')
        data = make_demo_dataset(root / 'data', num_classes=2, train_per_class=4, val_per_class=2, size=32, seed=0)
        paths = {s: build_formats(s, root / s) for s in SIZES}
        return {cell: run_cell(*cell, paths[cell[2]], data, root / 'cell') for cell in CELLS}
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize('fmt,consumer,size,variant', CELLS, ids=['-'.join(c) for c in CELLS])
def test_interop_cell(fmt, consumer, size, variant, matrix):
    check_cell(fmt, consumer, size, variant, matrix[(fmt, consumer, size, variant)])


def test_issue_reproduction_subprocess(tmp_path):
    """The issue's command: a LocalMIM-code checkpoint (no args) at ViT-Ti/4 32 px, `run_knn.py --model
    vit_tiny_patch16 --input_size 32 --patch_size 4` (was `KeyError: 'model'`), as a real process."""
    import models_mim
    from util.demo_data import make_demo_dataset
    data = make_demo_dataset(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=2, size=32, seed=0)
    torch.manual_seed(0)
    mim = models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4)  # ViT-Ti widths, patch 4
    torch.save({'model': mim.state_dict()}, tmp_path / 'ref.pth')
    r = subprocess.run([sys.executable, 'run_knn.py', '--model', 'vit_tiny_patch16', '--input_size', '32',
                        '--patch_size', '4', '--finetune', str(tmp_path / 'ref.pth'), '--data_path', str(data),
                        '--output_dir', str(tmp_path / 'knn'), '--device', 'cpu', '--num_workers', '0',
                        '--nb_knn', '2'], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert ('architecture: model vit_tiny_patch16 (typed), patch_size 4 (typed), embed_dim 192 (tensor shapes), '
            'depth 12 (tensor shapes), num_heads 3 (width 192 = vit_tiny_patch16), input_size 32 (typed)') in r.stdout
    assert re.search(r'^k-NN k=2: top-1 [\d.]+', r.stdout, re.M)


# ---- auto-resume never replaces an explicit --finetune (issue 9 §3) ----------------------------------------------


def _snapshot(d: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}


def test_auto_resume_never_replaces_an_explicit_finetune(tmp_path, single_thread):
    """A run in --output_dir started from --finetune A: the same command with --finetune B (a copy of A at another
    path) or another typed --input_size stops with exit 2 and one line naming both and the ways out, writing
    nothing; the same command again resumes."""
    import models_mim
    from util.demo_data import make_demo_dataset
    data = make_demo_dataset(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=2, size=32, seed=0)
    torch.manual_seed(0)
    mim = models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4,
                                  num_heads=2)
    args = dict(model='MIM_vit_tiny_patch16', input_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)
    torch.save({'model': mim.state_dict(), 'epoch': 0, 'args': args}, tmp_path / 'a.pth')
    (tmp_path / 'b.pth').write_bytes((tmp_path / 'a.pth').read_bytes())
    out = tmp_path / 'ft'
    common = ['--data_path', data, '--output_dir', out, '--device', 'cpu', '--num_workers', '0', '--batch_size', '4',
              '--warmup_epochs', '0']
    first = ['--finetune', tmp_path / 'a.pth', *common]
    rc, stdout, err = cli('run_finetune.py', [*first, '--epochs', '1'])
    assert rc == 0, err[-2000:]
    before = _snapshot(out)
    last = out / 'checkpoint-last.pth'
    r = subprocess.run([sys.executable, 'run_finetune.py', *map(str, ['--finetune', tmp_path / 'b.pth', *common,
                                                                      '--epochs', '2'])],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert lines[0] == (f'error: --output_dir {out} holds a run started with --finetune {tmp_path / "a.pth"} '
                        f'({last}, epoch 0), but this command asks for --finetune {tmp_path / "b.pth"}; to continue '
                        f'that run pass --resume {last}, to start this one pass a new --output_dir (or '
                        f'--no_auto_resume --overwrite, which moves that run aside)'), lines[0]
    assert _snapshot(out) == before
    rc, stdout, err = cli('run_finetune.py', [*first, '--epochs', '2', '--input_size', '48'])
    assert rc == 2 and re.search(r'^error: .*started with --input_size 32 .*asks for --input_size 48;', err, re.M), err
    assert _snapshot(out) == before
    rc, stdout, err = cli('run_finetune.py', [*first, '--epochs', '2'])  # the same command: resumes
    assert rc == 0, err[-2000:]
    assert f'Auto resume checkpoint: {last}' in stdout and 'next epoch 1' in stdout and 'Epoch: [1]' in stdout


def print_table() -> None:
    import tempfile
    from util.demo_data import make_demo_dataset
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_demo_dataset(root / 'data', num_classes=2, train_per_class=4, val_per_class=2, size=32, seed=0)
        paths = {s: build_formats(s, root / s) for s in SIZES}
        cols = [(c, s, v) for c in CONSUMERS for s in SIZES for v in VARIANTS]
        print('| format | ' + ' | '.join(f'{c} {s} {v}' for c, s, v in cols) + ' |')
        print('|---|' + '---|' * len(cols))
        for f in FORMATS:
            row = []
            for c, s, v in cols:
                rc, out, err = run_cell(f, c, s, v, paths[s], data, root / 'cell')
                if rc == 0 and 'Traceback' not in out + err:
                    row.append('ok')
                else:
                    last = ([l for l in err.splitlines() if l.strip()] or ['?'])[-1]
                    m = re.search(r'pass (--\w+)', last)
                    row.append(f'exit {rc}: pass {m.group(1)}' if m and rc == 2 else f'FAIL ({rc}: {last[:60]})')
            print(f'| {f} | ' + ' | '.join(row) + ' |', flush=True)


if __name__ == '__main__' and '--table' in sys.argv:
    print_table()
