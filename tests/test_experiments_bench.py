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


def _rows(t):
    return {l.split('|')[1].strip(): [c.strip() for c in l.split('|')[2:-1]] for l in t.splitlines()[2:]}


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
    # layer dropping on top of a freeze plan: the savings multiply, 1 - (1 - 0.2) * (1 - 0.25) = 0.4
    _write(tmp_path / 'layerdrop_cubic08' / 's1', [{'epoch': 0, 'knn_k20_top1': 47.0, 'planned_saving_so_far': 0.2,
                                                    'layer_drop_expected_saving': 0.25}], 50.0)
    t = ex.table(tmp_path, ['nofreeze', 'adaptive', 'ft_plain', 'constant', 'layerdrop_cubic08'], None,
                 {'constant': 'not run: run_pretrain.py has no --lr_schedule on this checkout'})
    rows = _rows(t)
    # columns after 'what': seeds done, k-NN, paired vs nofreeze, paired vs cubic08, ft, train s, wall, FLOP, meas, frozen
    assert rows['nofreeze'][1:] == ['2/2', '42.0 ± 2.8', '', '-', '-', '11.0 ± 1.4', '100.5 ± 0.7', '0.0 ± 0.0', '-',
                                    '0.0 ± 0.0']
    assert rows['adaptive'][1:] == ['1/1', '30.0', '-10 (1 seed)', '-', '-', '8.0', '90.0', '12.5', '10.0', '3.0']
    assert rows['ft_plain'][1:] == ['1/1', '-', '-', '-', '45.0 / 50.0', '5.0', '60.0', '0.0', '-', '0.0']
    assert rows['constant'][1] == 'not run: run_pretrain.py has no --lr_schedule on this checkout'
    assert rows['layerdrop_cubic08'][1:4] == ['1/1', '47.0', '+3 (1 seed)'] and rows['layerdrop_cubic08'][8] == '40.0'
    # the table of only some seeds
    assert _rows(ex.table(tmp_path, ['nofreeze'], [1], {}))['nofreeze'][1:3] == ['1/1', '44.0']


def test_paired_differences_and_the_noise_verdict(tmp_path):
    for row, vals in {'nofreeze': [51, 58, 59], 'cubic08': [44, 50, 50], 'grad_norm': [56, 50, 60]}.items():
        for seed, v in enumerate(vals):
            _write(tmp_path / row / f's{seed}', [{'epoch': 0, 'knn_k20_top1': float(v)}], 1.0)
    _write(tmp_path / 'grad_norm' / 's7', [{'epoch': 0, 'knn_k20_top1': 99.0}], 1.0)  # no nofreeze s7: not paired
    assert ex.paired(tmp_path, 'cubic08', 'nofreeze') == '-7, -8, -9 (mean -8.0; real)'
    # +5, -8, +1: the seeds disagree by 13 > |mean| 0.7
    assert ex.paired(tmp_path, 'grad_norm', 'nofreeze') == '+5, -8, +1 (mean -0.7; noise)'
    assert ex.paired(tmp_path, 'nofreeze', 'nofreeze') == ''
    _write(tmp_path / 'adaptive' / 's0', [{'epoch': 0, 'knn_k20_top1': 51.0}], 1.0)
    _write(tmp_path / 'adaptive' / 's1', [{'epoch': 0, 'knn_k20_top1': 58.0}], 1.0)
    assert ex.paired(tmp_path, 'adaptive', 'nofreeze') == '+0, +0 (mean +0.0; identical)'
    assert ex.paired(tmp_path, 'missing', 'nofreeze') == '-'
    assert ex.seeds_done(tmp_path, 'grad_norm') == [0, 1, 2, 7]


def test_row_sets_and_placeholders():
    for name, rows in ex.ROW_SETS.items():
        assert set(rows) <= set(ex.ALL_ROWS), name
    out = Path('/x')
    cmd = ex.row_command('teacher', 3, out, 'py', None, False)
    assert cmd[cmd.index('--teacher') + 1] == '/x/nofreeze/s3/checkpoint-last.pth'
    assert ex.row_command('cubic08', 0, out, 'py', None, False, 'cuda', 'bf16')[-4:] == ['--device', 'cuda', '--amp',
                                                                                       'bf16']
    cmd = ex.row_command('cubic08_fv4_cache', 0, out, 'py', None, False)
    assert cmd[cmd.index('--prefix_cache') + 1] == '/x/cubic08_fv4_cache/s0/prefix_cache'


def test_frontier_figure_every_row_a_point(tmp_path):
    import torch
    from tools import report
    for row, (saving, knns) in {'nofreeze': (None, [50.0, 58.0]), 'cubic08': (0.141, [44.0, 50.0]),
                                'layerdrop': (None, [49.0, 55.0])}.items():
        for seed, knn in enumerate(knns):
            d = tmp_path / row / f's{seed}'
            rec = {'epoch': 0, 'train_loss': 1.0, 'knn_k20_top1': knn}
            if saving is not None:
                rec['planned_saving_so_far'] = saving
            if row == 'layerdrop':
                rec['layer_drop_expected_saving'] = 0.2
            _write(d, [rec], 1.0)
            torch.save({'args': {'epochs': 1}}, d / 'checkpoint-last.pth')
    _write(tmp_path / 'unfinished' / 's0', [{'epoch': 0, 'train_loss': 1.0, 'knn_k20_top1': 1.0}], 1.0)
    rows = report.frontier_rows([(r, [report.read_run(str(tmp_path / r / f's{s}'), f's{s}') for s in (0, 1)
                                      if (tmp_path / r / f's{s}').is_dir()])
                                 for r in ('nofreeze', 'cubic08', 'layerdrop', 'unfinished')])
    assert [(r['name'], [round(x, 6) for x in r['saving']], r['top1']) for r in rows] == [
        ('nofreeze', [0.0, 0.0], [50.0, 58.0]), ('cubic08', [14.1, 14.1], [44.0, 50.0]),
        ('layerdrop', [20.0, 20.0], [49.0, 55.0])]  # the unfinished run (no checkpoint args) is not a point
    png = tmp_path / 'fig' / 'frontier.png'
    assert ex.figure(tmp_path, ['nofreeze', 'cubic08', 'layerdrop', 'ft_plain'], png) is None
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000
    # the report's CLI: one DIR per row
    assert report.main([str(tmp_path / 'nofreeze'), str(tmp_path / 'cubic08'), '--frontier', '--out',
                        str(tmp_path / 'rep')]) == 0
    md = (tmp_path / 'rep' / 'frontier.md').read_text()
    assert '| cubic08 | 2 | 14.1, 14.1 | 44.0, 50.0 |' in md and (tmp_path / 'rep' / 'frontier.png').is_file()
    assert report.write_frontier([], str(tmp_path / 'none.png')) == \
        'no row has a finished run with an online k-NN result'
