"""Smoke tests of the issue-10 benchmarks on minimal sizes (no timed asserts): the data pipeline bench and its
equivalence check, the GPU check without a GPU, the reference-ratio bench's loader of an external checkout (a
stand-in checkout here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
def _run(args, timeout=300, ok=True):
    p = subprocess.run([sys.executable] + [str(a) for a in args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1'))
    if ok:
        assert p.returncode == 0, f'{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p


def test_data_pipeline_bench_and_equivalence(tmp_path):
    out = tmp_path / 'dp.json'
    _run(['-m', 'bench.data_pipeline', '--dir', tmp_path / 'jpegs', '--images', '8', '--width', '80', '--height', '60',
          '--input_size', '32', '--batch_size', '4', '--batches', '1', '--workers', '1', '--check', '3',
          '--json', out])
    r = json.loads(out.read_text())
    assert {(x['variant'], x['workers']) for x in r['runs']} == {(v, w) for v in ('baseline', 'draft', 'tvjpeg',
                                                                                   'uint8') for w in (1,)}
    assert all(x['img_per_s'] > 0 and x['images'] == 4 for x in r['runs'])
    eq = r['equivalence']
    assert eq['uint8']['bit_equal'] and eq['uint8']['max_abs_diff'] == 0.0  # same ops, normalised later
    assert not eq['draft']['bit_equal'] and eq['draft']['psnr_db'] > 30      # another resampling, close
    assert sorted(p.name for p in (tmp_path / 'jpegs').glob('*.JPEG')) == [f'img{i:05d}.JPEG' for i in range(8)]
    p = _run(['-m', 'bench.data_pipeline', '--dir', tmp_path / 'jpegs', '--images', '8', '--variants', 'fast'],
             ok=False)
    assert p.returncode == 2 and p.stderr.startswith('error: --variants fast')


def test_gpu_check_without_gpu_writes_skipped_json(tmp_path):
    if torch.cuda.is_available():
        return  # on a GPU machine the real check is run by hand (bench/gpu_check.py), not from the test suite
    out = tmp_path / 'g.json'
    p = _run(['-m', 'bench.gpu_check', '--json', out])
    r = json.loads(out.read_text())
    assert r['cuda'] is False and 'no CUDA device' in p.stdout
    assert [x['part'] for x in r['parts']] == ['ddp', 'amp_bf16', 'amp_fp16', 'compile', 'finetune', 'prefix_cache',
                                               'flops', 'step_eager', 'step_compile', 'supply_demand']
    assert all(x['skipped'] == 'no CUDA device' for x in r['parts'])


FAKE_MODELS = '''
import torch, torch.nn as nn
from util.pos_embed import get_2d_sincos_pos_embed   # the reference's own util package, not ours
class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=256,
                 decoder_depth=1, decoder_num_heads=8, mlp_ratio=4., norm_layer=nn.LayerNorm, hog_nbins=9):
        super().__init__()
        assert get_2d_sincos_pos_embed() == 'reference'
        self.lin = nn.Linear(3, 1)
    def forward(self, imgs, mask_ratio=0.75):
        return self.lin(imgs.mean(dim=(2, 3))).pow(2).mean()
'''


def test_vs_reference_loads_an_external_checkout(tmp_path):
    ref = tmp_path / 'ViT'
    (ref / 'util').mkdir(parents=True)
    (ref / 'models_mim.py').write_text(FAKE_MODELS)
    (ref / 'util' / 'pos_embed.py').write_text("def get_2d_sincos_pos_embed():\n    return 'reference'\n")
    out = tmp_path / 'r.json'
    tiny16 = ['--input_size', '64', '--depth', '4', '--embed_dim', '48', '--num_heads', '3', '--batch_size', '2',
              '--threads', '1', '--steps', '1']
    p = _run(['-m', 'bench.vs_reference', '--reference_dir', ref, *tiny16, '--json', out])
    r = json.loads(out.read_text())
    assert r['speedup'] > 0 and len(r['losses']['ours']) == 2 and 'x (CPU time' in p.stdout


def test_vs_reference_rejects_a_folder_without_the_reference(tmp_path, capsys):
    from bench import vs_reference
    with pytest.raises(SystemExit) as e:
        vs_reference.load_reference(str(tmp_path))
    assert e.value.code == 2 and capsys.readouterr().err.startswith('error: --reference_dir')
