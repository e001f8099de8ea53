"""Reliability, bad input: every bad flag, file or dataset, a NaN loss and a resume with changed flags through the
real CLI: one line (``error: ...``), the documented exit code, no traceback, nothing in --output_dir changed.
The case tables (``BAD_INPUTS``, ``EVAL_BAD_INPUTS``) are also printed by ``python tests/test_reliability.py --table``.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Dict

import pytest

from reliability_common import (EVAL, FREEZE, ITERS, PARALLEL, pretrain_args, run, run_in_process, snapshot)


def _job_changed_flags(tmp: Path, demo: Path, ref: Path, existing_dir: Path):
    out = tmp / 'out'
    out.mkdir()
    shutil.copy(ref / 'checkpoint-last.pth', out / 'checkpoint-last.pth')
    return run('run_pretrain.py', pretrain_args(demo, out, '--blr', '2e-2', '--mask_ratio', '0.5'))


def test_resume_with_changed_flags_warns(bad_input_results) -> None:
    r = bad_input_results['_changed_flags']
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: resuming with --blr 0.02 but the checkpoint was trained with 0.01" in r.stdout
    assert "warning: resuming with --mask_ratio 0.5 but the checkpoint was trained with 0.75" in r.stdout



# ---- 3. non-finite loss ----------------------------------------------------------------------------------------


def _job_nan(tmp: Path, demo: Path, ref: Path, existing_dir: Path):
    out = tmp / 'out'
    shutil.copytree(existing_dir, out)
    before = snapshot(out)
    r = run('run_pretrain.py', pretrain_args(demo, out), VITFREEZE_TEST_NAN_AT_STEP=str(ITERS + 3))
    return r, out, before


def test_nan_loss_stops_with_message_and_writes_nothing(bad_input_results) -> None:
    """NaN loss at global micro-step 11 (epoch 1, iteration 3) after resuming from epoch 0: exit 3, one line naming
    epoch, iteration and the stage losses; checkpoint-last.pth and log.txt byte-identical."""
    r, out, before = bad_input_results['_nan']
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1, r.stderr
    assert re.fullmatch(r'error: loss is nan at epoch 1, iteration 3/8 \(stage0=[\d.]+, stage1=[\d.]+, '
                        r'stage2=[\d.]+, stage3=[\d.]+\); stopping without writing a checkpoint.*', err[0]), err[0]
    assert snapshot(out) == before


# ---- 4. bad input: one line, exit != 0, no traceback, nothing written over --------------------------------------


def _empty(tmp: Path) -> Path:
    (tmp / 'empty').mkdir()
    return tmp / 'empty'


def _no_images(tmp: Path) -> Path:
    for c in ('a', 'b'):
        (tmp / 'noimg' / 'train' / c).mkdir(parents=True)
        (tmp / 'noimg' / 'train' / c / 'readme.txt').write_text('not an image')
    return tmp / 'noimg'


def _corrupt(tmp: Path, demo: Path) -> Path:
    shutil.copytree(demo, tmp / 'data')
    bad = sorted((tmp / 'data' / 'train').rglob('*.jpg'))[3]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    return tmp / 'data'


def _text(tmp: Path) -> Path:
    (tmp / 'notes.txt').write_text('this is not a checkpoint\n')
    return tmp / 'notes.txt'


def _under_file(tmp: Path) -> Path:
    (tmp / 'afile').write_text('x')
    return tmp / 'afile' / 'out'


# id -> (builder of extra/override args given tmp, demo, reference; expected regex of the one line)
# Each builder returns (args, data_path or None (= demo train data)).
BAD_INPUTS = {
    'data_path_missing': (lambda t, d, ref: ['--data_path', t / 'nope'],
                          r'error: --data_path .*nope does not exist'),
    'data_path_empty': (lambda t, d, ref: ['--data_path', _empty(t)],
                        r'error: --data_path .*empty: no image files found'),
    'data_path_no_images': (lambda t, d, ref: ['--data_path', _no_images(t)],
                            r'error: --data_path .*noimg: no image files found'),
    'corrupt_image': (lambda t, d, ref: ['--data_path', _corrupt(t, d)],
                      r'error: cannot read image .*\.jpg: .*--bad_images skip'),
    't_0_above_1': (lambda t, d, ref: ['--t_0', '1.5'], r'error: --t_0 1\.5: must be in \(0, 1\]'),
    'how_scale_unknown': (lambda t, d, ref: ['--how_scale', 'quartic'],
                          r"error: argument --how_scale: invalid choice: 'quartic'"),
    'model_unknown': (lambda t, d, ref: ['--model', 'MIM_vit_gigantic_patch16'],
                      r'error: .*MIM_vit_gigantic_patch16'),
    'input_size_not_divisible': (lambda t, d, ref: ['--input_size', '30'], r'error: .*30.*patch.*4|error: .*4.*30'),
    'hog_cell_not_integer': (lambda t, d, ref: ['--patch_size', '6', '--input_size', '36'],
                             r'error: HOG cell of patch_size/scale = 6/4 = 1\.5 px is not a whole number'),
    'batch_size_0': (lambda t, d, ref: ['--batch_size', '0'], r'error: --batch_size 0: must be >= 1'),
    'accum_iter_0': (lambda t, d, ref: ['--accum_iter', '0'], r'error: --accum_iter 0: must be >= 1'),
    'mask_ratio_1': (lambda t, d, ref: ['--mask_ratio', '1.0'], r'error: --mask_ratio 1\.0: must be in \(0, 1\)'),
    'resume_missing': (lambda t, d, ref: ['--resume', t / 'missing.pth'],
                       r'error: --resume .*missing\.pth: file not found'),
    'resume_not_checkpoint': (lambda t, d, ref: ['--resume', _text(t)],
                              r'error: --resume .*notes\.txt: not a PyTorch checkpoint \(not written by torch\.save\)'),
    'resume_other_architecture': (lambda t, d, ref: ['--resume', ref / 'checkpoint-0.pth', '--embed_dim', '32'],
                                  r'error: --resume .*checkpoint-0\.pth: checkpoint does not match'),
    'resume_frozen_without_freezeout': (lambda t, d, ref: ['--resume', ref / 'checkpoint-1.pth'],
                                        r'error: --resume .*checkpoint-1\.pth: the checkpoint has frozen FreezeOut'),
    'resume_freezeout_optimizer_without_freezeout': (lambda t, d, ref: ['--resume', ref / 'checkpoint-0.pth'],
                                                     r'error: --resume .*checkpoint-0\.pth: optimizer state does not '
                                                     r'match these flags'),
    'output_dir_not_writable': (lambda t, d, ref: ['--output_dir', _under_file(t)],
                                r'error: --output_dir .*afile/out: cannot create directory'),
}



NO_FREEZEOUT = {'resume_frozen_without_freezeout', 'resume_freezeout_optimizer_without_freezeout'}


def run_bad_input(case: str, tmp: Path, demo: Path, ref: Path, existing_dir: Path):
    build, pattern = BAD_INPUTS[case]
    out = tmp / 'out'
    shutil.copytree(existing_dir, out)
    before = snapshot(out)
    extra = [str(a) for a in build(tmp, demo, ref)]
    args = pretrain_args(demo, out) + extra
    if case in NO_FREEZEOUT:
        args = [a for a in args if a not in FREEZE]
    r = run_in_process('run_pretrain.py', args)  # ~0.5 s instead of ~6 s of interpreter and torch start-up
    return r, pattern, out, before, ['run_pretrain.py', *extra]


@pytest.fixture(scope='module')
def bad_input_results(demo_root: Path, reference: Path, existing: Path, tmp_path_factory: pytest.TempPathFactory):
    """All bad-input cases, plus the NaN, --bad_images skip and changed-flags runs (keys ``_nan``, ``_skip``,
    ``_changed_flags``), each in its own tmp dir (with its own copy of ``existing``). The three training runs are
    subprocesses, PARALLEL at a time in threads; meanwhile the bad-input cases run one by one in this process (main
    thread: the scripts install signal handlers)."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = dict(_nan=_job_nan, _skip=_job_skip, _changed_flags=_job_changed_flags)
    with ThreadPoolExecutor(PARALLEL) as pool:
        futs = {c: pool.submit(fn, tmp_path_factory.mktemp(c.strip('_')), demo_root, reference, existing)
                for c, fn in jobs.items()}
        res = {c: run_bad_input(c, tmp_path_factory.mktemp(c), demo_root, reference, existing) for c in BAD_INPUTS}
        res.update({c: f.result() for c, f in futs.items()})
    return res


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_one_line_and_nothing_written(case: str, bad_input_results) -> None:
    r, pattern, out, before, _ = bad_input_results[case]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert 'Traceback' not in r.stderr + r.stdout
    err = [l for l in r.stderr.splitlines() if l.startswith('error')]
    assert len(err) == 1, r.stderr
    assert re.search(pattern, err[0]), err[0]
    assert err[0] == [l for l in r.stderr.splitlines() if l.strip()][-1]  # the last word on stderr
    if out.exists():
        assert snapshot(out) == before


def _job_skip(tmp: Path, demo: Path, ref: Path, existing_dir: Path):
    data = _corrupt(tmp, demo)
    out = tmp / 'out'
    return run('run_pretrain.py', pretrain_args(data, out, '--bad_images', 'skip', '--no_auto_resume', epochs=1)), out


def test_corrupt_image_skip_warns_and_continues(bad_input_results) -> None:
    r, out = bad_input_results['_skip']
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r'skipping unreadable image .*\.jpg', r.stdout + r.stderr)
    assert (out / 'checkpoint-0.pth').exists()



# ---- evaluators ------------------------------------------------------------------------------------------------


def _few_val(tmp: Path, demo: Path) -> Path:
    """train/ with 4 classes, val/ with 2 images (in 2 of the class folders)."""
    shutil.copytree(demo / 'train', tmp / 'fewval' / 'train')
    for c in sorted(os.listdir(demo / 'val'))[:2]:
        (tmp / 'fewval' / 'val' / c).mkdir(parents=True)
        f = sorted((demo / 'val' / c).iterdir())[0]
        shutil.copy(f, tmp / 'fewval' / 'val' / c / f.name)
    return tmp / 'fewval'


# id -> (script, builder(tmp, demo, evaluated) -> extra args, expected regex). Run with --no_auto_resume
# --overwrite unless the case is about --resume (run_knn.py has no resume flags), in an output_dir holding a fine-tuning
# checkpoint-last.pth and log.txt.
EVAL_BAD_INPUTS = {
    'finetune_other_architecture': ('run_finetune.py', lambda t, d, e: ['--finetune', e['pre'], '--embed_dim', '32'],
                                    r'error: --finetune .*checkpoint-2\.pth: checkpoint architecture does not match '
                                    r'the model: checkpoint has embed_dim=64.* model has embed_dim=32'),
    'finetune_not_checkpoint': ('run_linprobe.py', lambda t, d, e: ['--finetune', _text(t)],
                                r'error: --finetune .*notes\.txt: not a PyTorch checkpoint'),
    'resume_pretrain_checkpoint_in_finetune': ('run_finetune.py', lambda t, d, e: ['--resume', e['pre']],
                                               r'error: --resume .*checkpoint-2\.pth: not a checkpoint of this model'),
    'nb_classes_smaller_than_folders': ('run_finetune.py', lambda t, d, e: ['--nb_classes', '2'],
                                        r'error: --nb_classes 2 is smaller than the 4 class folders'),
    'knn_fewer_val_images_than_classes': ('run_knn.py', lambda t, d, e: ['--finetune', e['pre'], '--data_path',
                                                                          _few_val(t, d)],
                                          r'error: --data_path .*fewval: val/ has 2 images but train/ has 4 classes'),
}


def run_eval_bad_input(case: str, tmp: Path, demo: Path, evaluated_dirs: Dict[str, Path]):
    script, build, pattern = EVAL_BAD_INPUTS[case]
    out = tmp / 'out'
    out.mkdir()
    shutil.copy(evaluated_dirs['ft'] / 'checkpoint-0.pth', out / 'checkpoint-last.pth')
    (out / 'log.txt').write_text((evaluated_dirs['ft'] / 'log.txt').read_text().splitlines(keepends=True)[0])
    before = snapshot(out)
    extra = [str(a) for a in build(tmp, demo, evaluated_dirs)]
    args = [*EVAL, '--data_path', str(demo), '--output_dir', str(out), *extra]
    if '--resume' not in extra and script != 'run_knn.py':  # k-NN trains nothing: no resume flags
        args += ['--no_auto_resume', '--overwrite']  # from scratch over a folder with a checkpoint (moved at 1st write)
    r = run_in_process(script, args)
    return r, pattern, out, before, [script, *extra]


@pytest.fixture(scope='module')
def eval_bad_input_results(evaluated: Dict[str, Path], demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    return {c: run_eval_bad_input(c, tmp_path_factory.mktemp(c), demo_root, evaluated) for c in EVAL_BAD_INPUTS}


@pytest.mark.parametrize('case', list(EVAL_BAD_INPUTS))
def test_evaluator_bad_input_one_line_and_nothing_written(case: str, eval_bad_input_results) -> None:
    _check_bad_input(eval_bad_input_results[case])


def _check_bad_input(result) -> None:
    r, pattern, out, before, _ = result
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert 'Traceback' not in r.stderr + r.stdout
    err = [l for l in r.stderr.splitlines() if l.startswith('error')]
    assert len(err) == 1, r.stderr
    assert re.search(pattern, err[0]), err[0]
    assert err[0] == [l for l in r.stderr.splitlines() if l.strip()][-1]
    assert snapshot(out) == before


