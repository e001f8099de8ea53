"""End-to-end: the evaluation CLIs on the tiny demo set with a tiny pre-training checkpoint (subprocesses, CPU)."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models_mim
import run_finetune
import run_knn
import run_linprobe
from util.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TINY_ARGS = dict(model='MIM_vit_tiny_patch16', input_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                 all_stages=False)


pytestmark = pytest.mark.usefixtures('single_thread')  # tiny tensors on 2 shared cores (tests/conftest.py)


@pytest.fixture(scope='module')
def pretrain_ckpt(tmp_path_factory) -> str:
    """What run_pretrain.py --demo writes, minus training: a tiny LocalMIM state dict with its args."""
    torch.manual_seed(0)
    mim = models_mim.create_model('MIM_vit_tiny_patch16', img_size=32, patch_size=4, embed_dim=64, depth=4,
                                  num_heads=4)
    path = tmp_path_factory.mktemp('pretrain') / 'checkpoint-0.pth'
    torch.save({'model': mim.state_dict(), 'epoch': 0, 'args': TINY_ARGS}, path)
    return str(path)


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, f'{script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p


def in_process(module, *argv: str) -> None:
    """``module.main`` on parsed argv, in this process (for cheap runs: no interpreter + torch start-up)."""
    args = argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(list(argv))
    args.argv = list(argv)
    module.main(args)


def accuracies(stdout: str):
    found = [(float(a), float(b)) for a, b in re.findall(r'^\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss [\d.]+$', stdout,
                                                          re.M)]
    assert found and all(0 <= a <= 100 and 0 <= b <= 100 for a, b in found)
    return found


def log_lines(out: Path):
    return [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]


@pytest.mark.slow
def test_knn_cli_seed_flags_dump_and_load(pretrain_ckpt, demo_root, tmp_path, capsys):
    out, feats = tmp_path / 'knn', tmp_path / 'feats'
    p = run('run_knn.py', '--local-rank=0', '--world_size', '1', '--batch_size', '8', '--model', 'vit_tiny_patch16',
            '--finetune', pretrain_ckpt, '--dist_eval', '--data_path', str(demo_root), '--output_dir', str(out),
            '--log_dir', str(tmp_path / 'tb'), '--input_size', '32', '--num_workers', '0', '--nb_knn', '5', '20',
            '100', '--dump_features', str(feats))
    lines = re.findall(r'^k-NN k=(\d+): top-1 ([\d.]+) top-5 ([\d.]+)$', p.stdout, re.M)
    assert [k for k, _, _ in lines] == ['5', '20', '100']
    assert all(0 <= float(a) <= 100 and 0 <= float(b) <= 100 for _, a, b in lines)
    assert 'k=100 exceeds the 32 train images' in p.stdout
    rec = log_lines(out)[-1]
    assert {'knn_k5_top1', 'knn_k5_top5', 'knn_k20_top1', 'knn_k100_top5'} <= set(rec)
    assert any(f.name.startswith('events.out.tfevents') for f in (tmp_path / 'tb').iterdir())
    capsys.readouterr()
    in_process(run_knn, '--load_features', str(feats), '--nb_knn', '5', '20', '100', '--output_dir',
               str(tmp_path / 'knn2'), '--device', 'cpu')
    result = r'^k-NN k=.*$'
    assert re.findall(result, capsys.readouterr().out, re.M) == re.findall(result, p.stdout, re.M)


def test_knn_demo_random_init(demo_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('VITFREEZE_DEMO_DIR', str(demo_root))  # a complete demo set there is reused as is
    in_process(run_knn, '--demo', '--output_dir', str(tmp_path), '--num_workers', '0', '--nb_knn', '20')
    out = capsys.readouterr().out
    assert 'randomly initialised vit_tiny_patch16' in out and 'k-NN on 32 train / 16 val images' in out
    assert re.search(r'^k-NN k=20: top-1 [\d.]+ top-5 [\d.]+$', out, re.M)
    assert log_lines(tmp_path)[-1]['source'] == 'random-init'


@pytest.mark.slow
def test_finetune_cli_and_resume(pretrain_ckpt, demo_root, tmp_path, capsys):
    out = tmp_path / 'ft'
    seed = ['--world_size', '1', '--accum_iter', '2', '--batch_size', '4', '--model', 'vit_tiny_patch16',
            '--warmup_epochs', '1', '--lr', '4e-3', '--min_lr', '1e-6', '--layer_decay', '0.75', '--weight_decay',
            '0.05', '--drop_path', '0.1', '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0', '--dist_eval',
            '--data_path', str(demo_root), '--output_dir', str(out), '--log_dir', str(out),
            '--input_size', '32', '--num_workers', '0']
    p = run('run_finetune.py', *seed, '--finetune', pretrain_ckpt, '--epochs', '1')
    accuracies(p.stdout)
    assert 'Max accuracy' in p.stdout and 'effective batch size: 8' in p.stdout
    # width 64 / depth 4 from the tensors, 4 heads from the checkpoint's args (no --embed_dim/--depth/--num_heads)
    assert ('architecture: model vit_tiny_patch16 (typed), patch_size 4 (tensor shapes), embed_dim 64 (tensor '
            'shapes), depth 4 (tensor shapes), num_heads 4 (checkpoint args), input_size 32 (typed)') in p.stdout
    capsys.readouterr()
    in_process(run_finetune, '--resume', str(out / 'checkpoint-0.pth'), *seed, '--epochs', '2')
    stdout = capsys.readouterr().out
    assert 'next epoch 1' in stdout and 'Epoch: [1]' in stdout and 'Epoch: [0]' not in stdout
    accuracies(stdout)
    recs = log_lines(out)
    assert [r['epoch'] for r in recs] == [0, 1]
    assert {'train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters'} <= set(recs[0])


@pytest.mark.slow
def test_linprobe_cli_and_auto_resume(pretrain_ckpt, demo_root, tmp_path, capsys):
    out = tmp_path / 'lp'
    seed = ['--world_size', '1', '--accum_iter', '1', '--batch_size', '8', '--model', 'vit_tiny_patch16',
            '--finetune', pretrain_ckpt, '--warmup_epochs', '1', '--blr', '0.1', '--weight_decay', '0.0',
            '--dist_eval', '--data_path', str(demo_root), '--output_dir', str(out), '--log_dir', str(out),
            '--input_size', '32', '--num_workers', '0']
    p = run('run_linprobe.py', *seed, '--epochs', '1')
    accuracies(p.stdout)
    assert 'stage norm norm.3 (after the last block) loaded as the final norm' in p.stdout
    capsys.readouterr()
    in_process(run_linprobe, *seed, '--epochs', '2')
    stdout = capsys.readouterr().out
    assert 'Auto resume checkpoint' in stdout and 'next epoch 1' in stdout and 'Epoch: [0]' not in stdout
    assert [r['epoch'] for r in log_lines(out)] == [0, 1]


def test_bad_inputs_are_user_errors(demo_root, tmp_path):
    with pytest.raises(UserError, match=r'^--nb_classes 2 is smaller than the 4 class folders'):
        in_process(run_finetune, '--data_path', str(demo_root), '--nb_classes', '2', '--output_dir', str(tmp_path),
                   '--device', 'cpu')
    with pytest.raises(UserError, match=r'^--finetune .*missing.pth: file not found'):
        in_process(run_linprobe, '--data_path', str(demo_root), '--finetune', str(tmp_path / 'missing.pth'),
                   '--output_dir', str(tmp_path), '--device', 'cpu')


SEED = {
    run_finetune: ['--world_size', '4', '--accum_iter', '2', '--batch_size', '128', '--model', 'vit_base_patch16',
                   '--finetune', 'X/checkpoint-99.pth', '--epochs', '100', '--warmup_epochs', '20', '--lr', '4e-3',
                   '--min_lr', '1e-6', '--layer_decay', '0.75', '--weight_decay', '0.05', '--drop_path', '0.1',
                   '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0', '--dist_eval', '--data_path', 'D',
                   '--output_dir', 'O', '--log_dir', 'L'],
    run_linprobe: ['--world_size', '1', '--accum_iter', '8', '--batch_size', '2048', '--model', 'vit_base_patch16',
                   '--finetune', 'X', '--epochs', '90', '--warmup_epochs', '10', '--blr', '0.1', '--weight_decay',
                   '0.0', '--dist_eval', '--data_path', 'D', '--output_dir', 'O', '--log_dir', 'L'],
    run_knn: ['--world_size', '1', '--batch_size', '128', '--model', 'vit_base_patch16', '--finetune', 'X',
              '--dist_eval', '--data_path', 'D', '--output_dir', 'O', '--log_dir', 'L'],
}


@pytest.mark.parametrize('module', list(SEED), ids=lambda m: m.__name__)
def test_seed_command_lines_parse(module):
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
    args = parser.parse_args(['--local-rank=0'] + SEED[module])
    assert args.local_rank == 0 and args.model == 'vit_base_patch16' and args.dist_eval
    if module is run_finetune:
        resume = parser.parse_args(['--resume', 'R/checkpoint-40.pth', '--world_size', '1', '--accum_iter', '8']
                                   + SEED[module][4:8] + SEED[module][10:])  # the seed's resume variant
        assert resume.resume == 'R/checkpoint-40.pth' and resume.finetune == '' and resume.accum_iter == 8
        assert (args.batch_size, args.accum_iter, args.mixup, args.cutmix, args.global_pool) == (128, 2, 0.8, 1.0,
                                                                                                 True)
        assert (args.save_freq, args.smoothing, args.aa) == (20, 0.1, 'rand-m9-mstd0.5-inc1')
    if module is run_linprobe:
        assert (args.blr, args.weight_decay, args.global_pool, args.min_lr) == (0.1, 0.0, False, 0.0)
    if module is run_knn:
        assert (args.nb_knn, args.temperature, args.global_pool) == ([10, 20, 100, 200], 0.07, False)
