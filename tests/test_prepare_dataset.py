"""tools/prepare_dataset.py: sizes and formats, idempotent reruns, interrupted runs, refusals (tiny PIL images)."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tools import prepare_dataset as pd
from util.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make(src, sizes=None):
    """An ImageFolder of two classes: JPEGs of the given (w, h), one PNG, one non-image file."""
    sizes = sizes or [(120, 80), (50, 90), (64, 64), (30, 20)]
    for i, (w, h) in enumerate(sizes):
        d = src / f'class{i % 2}'
        d.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (w, h), (i * 40, 100, 200)).save(d / f'img{i}.jpg', quality=95)
    Image.new('RGBA', (100, 40), (1, 2, 3, 128)).save(src / 'class0' / 'alpha.png')
    (src / 'class1' / 'notes.txt').write_text('not an image')
    return src


def _files(root):
    return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


def test_sizes_formats_and_manifest(tmp_path):
    src, dst = _make(tmp_path / 'src'), tmp_path / 'dst'
    assert pd.main([str(src), str(dst), '--max_side', '64', '--workers', '1']) == 0
    assert _files(dst) == ['class0/alpha.png', 'class0/img0.jpg', 'class0/img2.jpg', 'class1/img1.jpg',
                           'class1/img3.jpg', pd.MANIFEST]
    sizes = {f: Image.open(dst / f).size for f in _files(dst) if f != pd.MANIFEST}
    assert sizes == {'class0/img0.jpg': (64, 43), 'class1/img1.jpg': (36, 64), 'class0/img2.jpg': (64, 64),
                     'class1/img3.jpg': (30, 20), 'class0/alpha.png': (64, 26)}
    assert Image.open(dst / 'class0/alpha.png').format == 'PNG' and Image.open(dst / 'class0/alpha.png').mode == 'RGBA'
    # not upscaled and within the limit: byte-for-byte copies
    for f in ('class0/img2.jpg', 'class1/img3.jpg'):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    m = json.loads((dst / pd.MANIFEST).read_text())
    assert (m['images'], m['written'], m['copied'], m['skipped'], m['failed'], m['other_files']) == (5, 3, 2, 0, 0, 1)
    assert (m['max_side'], m['quality']) == (64, 90)
    assert m['bytes_in'] == sum(os.path.getsize(src / f) for f in sizes)
    assert m['bytes_out'] == sum(os.path.getsize(dst / f) for f in sizes)


def test_quality_flag_changes_jpeg_size(tmp_path):
    src = tmp_path / 'src' / 'c'
    src.mkdir(parents=True)
    import numpy as np
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(src / 'n.jpg')
    pd.prepare(str(tmp_path / 'src'), str(tmp_path / 'q30'), 50, quality=30)
    pd.prepare(str(tmp_path / 'src'), str(tmp_path / 'q95'), 50, quality=95)
    assert os.path.getsize(tmp_path / 'q30/c/n.jpg') < os.path.getsize(tmp_path / 'q95/c/n.jpg')


def test_idempotent_second_run_skips(tmp_path):
    src, dst = _make(tmp_path / 'src'), tmp_path / 'dst'
    pd.prepare(str(src), str(dst), 64)
    before = {f: os.stat(dst / f).st_mtime_ns for f in _files(dst) if f != pd.MANIFEST}
    m = pd.prepare(str(src), str(dst), 64)
    assert (m['written'], m['copied'], m['skipped']) == (0, 0, 5)
    assert {f: os.stat(dst / f).st_mtime_ns for f in _files(dst) if f != pd.MANIFEST} == before


def test_interrupted_run_leaves_no_partial_file_and_rerun_completes(tmp_path, monkeypatch):
    src, dst = _make(tmp_path / 'src'), tmp_path / 'dst'
    real_save, calls = Image.Image.save, []

    def dying_save(self, fp, *a, **k):   # the second re-encode writes half a file, then the process "dies"
        calls.append(fp)
        if len(calls) == 2:
            with open(fp, 'wb') as f:
                f.write(b'\xff\xd8 half')
            raise KeyboardInterrupt
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        pd.prepare(str(src), str(dst), 64)
    monkeypatch.setattr(Image.Image, 'save', real_save)
    # nothing half-written under a real name, and the temp file went with the failure
    for f in _files(dst):
        Image.open(dst / f).verify()
    # a leftover temp file (as a SIGKILL would leave it) is removed by the rerun, which completes
    (dst / 'class1').mkdir(exist_ok=True)
    leftover = dst / 'class1' / f'.img1.jpg{pd.TMP_TAG}999'
    leftover.write_bytes(b'partial')
    m = pd.prepare(str(src), str(dst), 64)
    assert not leftover.exists() and m['temp_files_removed'] == 1
    assert m['written'] + m['copied'] + m['skipped'] == 5 and m['failed'] == 0
    assert len([f for f in _files(dst) if f != pd.MANIFEST]) == 5
    assert not [f for f in _files(dst) if pd.TMP_TAG in f]


def test_parallel_matches_serial(tmp_path):
    src = _make(tmp_path / 'src')
    pd.prepare(str(src), str(tmp_path / 'a'), 48, workers=1)
    m = pd.prepare(str(src), str(tmp_path / 'b'), 48, workers=2)
    assert m['written'] + m['copied'] == 5
    for f in _files(tmp_path / 'a'):
        if f != pd.MANIFEST:
            assert (tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes()


def test_corrupt_image_reported_exit_1(tmp_path, capsys):
    src = _make(tmp_path / 'src')
    (src / 'class0' / 'bad.jpg').write_bytes(b'not a jpeg')
    assert pd.main([str(src), str(tmp_path / 'dst'), '--max_side', '64', '--workers', '1']) == 1
    assert 'bad.jpg' in capsys.readouterr().err
    assert not (tmp_path / 'dst' / 'class0' / 'bad.jpg').exists()


@pytest.mark.parametrize('case', ['inside', 'same', 'contains', 'missing', 'zero', 'negative', 'quality'])
def test_refusals(tmp_path, case):
    src = _make(tmp_path / 'src')
    argv = {'inside': [str(src), str(src / 'out'), '--max_side', '64'],
            'same': [str(src), str(src), '--max_side', '64'],
            'contains': [str(src), str(tmp_path), '--max_side', '64'],
            'missing': [str(tmp_path / 'nope'), str(tmp_path / 'dst'), '--max_side', '64'],
            'zero': [str(src), str(tmp_path / 'dst'), '--max_side', '0'],
            'negative': [str(src), str(tmp_path / 'dst'), '--max_side', '-5'],
            'quality': [str(src), str(tmp_path / 'dst'), '--max_side', '64', '--quality', '101']}[case]
    with pytest.raises(UserError) as e:
        pd.main(argv)
    assert '\n' not in str(e.value)
    assert {'inside': 'inside SRC', 'same': 'inside SRC', 'contains': 'inside DST', 'missing': 'no such directory',
            'zero': '--max_side', 'negative': '--max_side', 'quality': '--quality'}[case] in str(e.value)
    assert not (src / 'out').exists() and not (tmp_path / 'dst').exists()


def test_cli_refusal_is_one_line_exit_2(tmp_path):
    src = _make(tmp_path / 'src')
    r = subprocess.run([sys.executable, '-m', 'tools.prepare_dataset', str(src), str(src / 'o'), '--max_side', '8'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'inside SRC' in r.stderr
