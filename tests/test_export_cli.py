"""tools/export.py never destroys a checkpoint (issue 14 §1): not the input (same path, symlink, hard link), not an
existing file without --overwrite, and a failed write (here a file-size limit) leaves the previous export intact.
Each refusal: exit 2, one ``error:`` line, every file byte-identical."""
from __future__ import annotations

import hashlib
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / 'tests')) if p not in sys.path]
from cli_inproc import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory) -> Path:
    """A tiny pre-training checkpoint as run_pretrain.py writes it (args recorded)."""
    import models_mim
    torch.manual_seed(0)
    mim = models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4,
                                  num_heads=2)
    path = tmp_path_factory.mktemp('export') / 'checkpoint-3.pth'
    torch.save({'model': mim.state_dict(), 'epoch': 3, 'args': dict(
        model='MIM_vit_tiny_patch16', input_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)}, path)
    return path


def digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _one_error(rc, err: str, pattern: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and 'Traceback' not in err, (rc, err)
    assert re.fullmatch(pattern, lines[0]), lines[0]


@pytest.mark.parametrize('how', ['same_path', 'symlink', 'hardlink'])
def test_export_refuses_to_write_over_its_input(ckpt: Path, tmp_path: Path, how: str) -> None:
    src = tmp_path / 'ckpt.pth'
    src.write_bytes(ckpt.read_bytes())
    target = {'same_path': src, 'symlink': tmp_path / 'link.pth', 'hardlink': tmp_path / 'hard.pth'}[how]
    if how == 'symlink':
        target.symlink_to(src)
    elif how == 'hardlink':
        os.link(src, target)
    before = digests(tmp_path)
    rc, _, err = cli('tools.export', ['--checkpoint', src, '--output', target, '--overwrite'])
    _one_error(rc, err, rf'error: --output {re.escape(str(target))}: .* is the --checkpoint itself \(same file, or a '
                        rf'link to it\); exporting over it would destroy the checkpoint; choose another --output')
    assert digests(tmp_path) == before


def test_export_never_overwrites_silently_and_writes_atomically(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / 'enc.pth'
    rc, stdout, err = cli('tools.export', ['--checkpoint', ckpt, '--output', out])
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ['enc.pth', 'enc.pth.json']  # no temp file left
    good = digests(tmp_path)
    # an existing export (or any file) is not replaced without --overwrite
    rc, _, err = cli('tools.export', ['--checkpoint', ckpt, '--output', out, '--pool', 'avg'])
    _one_error(rc, err, rf'error: --output {re.escape(str(out))}: .*enc\.pth and .*enc\.pth\.json already exist\(s\); '
                        r'pass --overwrite to replace them, or choose another --output')
    assert digests(tmp_path) == good
    # a write that fails half-way (file-size limit below the export's size) keeps the previous export intact
    limit = out.stat().st_size // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    r = subprocess.run([sys.executable, 'tools/export.py', '--checkpoint', str(ckpt), '--output', str(out),
                        '--pool', 'avg', '--overwrite'], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'), preexec_fn=small_files)
    _one_error(r.returncode, r.stderr, rf'error: --output {re.escape(str(out))}: cannot write the export \(File too '
                                       r'large\); any previous file there is unchanged')
    assert digests(tmp_path) == good and sorted(os.listdir(tmp_path)) == ['enc.pth', 'enc.pth.json']
    # --overwrite replaces it, saying so
    rc, stdout, err = cli('tools.export', ['--checkpoint', ckpt, '--output', out, '--pool', 'avg', '--overwrite'])
    assert rc == 0, err
    assert f'note: --overwrite: replacing {out}' in stdout
    assert digests(tmp_path)['enc.pth.json'] != good['enc.pth.json']  # the avg-pool recipe
    assert sorted(os.listdir(tmp_path)) == ['enc.pth', 'enc.pth.json']
