"""bench/experiments.py (docs/EXPERIMENTS.md): the rows' exact command lines and the table read from log.txt."""
import json
from pathlib import Path

from bench import experiments as ex


def _write(d: Path, recs, wall):
    d.mkdir(parents=True)
    (d / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    (d / 'wall.json').write_text(json.dumps({'seconds': wall}))


def test_row_commands():
    out = Path('/x')
    assert ex.row_command('cubic08', 1, out, 'py', None, False) == [
        'py', 'run_pretrain.py', '--demo', '--seed', '1', '--output_dir', '/x/cubic08/s1', '--log_dir',
        '/x/cubic08/s1/tb', '--how_scale', 'cubic', '--t_0', '0.8']
    ft = ex.row_command('ft_cubic08', 0, out, 'py', '/data', False)
    assert ft[:6] == ['py', 'run_finetune.py', '--demo', '--seed', '0', '--finetune']
    assert ft[6] == '/x/nofreeze/s0/checkpoint-last.pth' and ft[-2:] == ['--data_path', '/data']
    assert set(ex.ALL_ROWS) >= {'nofreeze', 'cubic08', 'cubic07', 'adaptive', 'constant', 'curriculum', 'ft_plain',
                                'ft_cubic08'}


def test_table_from_logs(tmp_path):
    for seed, (knn, t) in enumerate([(40.0, 10.0), (44.0, 12.0)]):
        _write(tmp_path / 'nofreeze' / f's{seed}', [{'epoch': 0, 'train_compute_time': t / 2},
                                                    {'epoch': 1, 'train_compute_time': t / 2, 'knn_k20_top1': knn,
                                                     'knn_k10_top1': 1.0}], 100.0 + seed)
    _write(tmp_path / 'adaptive' / 's0', [{'epoch': 0, 'train_compute_time': 8.0, 'knn_k10_top1': 30.0,
                                           'decided_saving_so_far': 0.125, 'measured_saving_so_far': 0.1,
                                           'frozen_units': 3}], 90.0)
    _write(tmp_path / 'ft_plain' / 's0', [{'epoch': 0, 'test_acc1': 50.0, 'train_epoch_time': 2.0},
                                          {'epoch': 1, 'test_acc1': 45.0, 'train_epoch_time': 3.0}], 60.0)
    t = ex.table(tmp_path, ['nofreeze', 'adaptive', 'ft_plain', 'constant'], [0, 1],
                 {'constant': 'not run: run_pretrain.py has no --lr_schedule on this checkout'})
    rows = {l.split('|')[1].strip(): [c.strip() for c in l.split('|')[2:-1]] for l in t.splitlines()[2:]}
    assert rows['nofreeze'][1:] == ['2/2', '42.0 ± 2.8', '-', '11.0 ± 1.4', '100.5 ± 0.7', '0.0 ± 0.0', '-',
                                    '0.0 ± 0.0']
    assert rows['adaptive'][1:] == ['1/2', '30.0', '-', '8.0', '90.0', '12.5', '10.0', '3.0']
    assert rows['ft_plain'][1:] == ['1/2', '-', '45.0 / 50.0', '5.0', '60.0', '0.0', '-', '0.0']
    assert rows['constant'][1] == 'not run: run_pretrain.py has no --lr_schedule on this checkout'
