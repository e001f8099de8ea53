"""Per-epoch data-wait share (log.txt + TensorBoard) and the one-line data-bound note: it appears for a loader made
slow on purpose (injected by the test around the real loader) and not for the fast one."""
import json
import sys
import time

import pytest

from conftest import TINY_PRETRAIN_FLAGS

pytestmark = pytest.mark.usefixtures('single_thread')


class SlowLoader:
    """The real DataLoader, with ``delay`` seconds of extra wait before every batch (a slow disk, too few workers)."""

    def __init__(self, loader, delay):
        self.loader, self.delay = loader, delay

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # sampler, dataset, generator, persistent_workers: seed_loader_epoch drives them
        return getattr(self.loader, name)


def _train(demo_root, tmp_path, monkeypatch, capsys, delay):
    import run_pretrain
    if delay:
        real = run_pretrain.build_loader
        monkeypatch.setattr(run_pretrain, 'build_loader', lambda *a, **k: SlowLoader(real(*a, **k), delay))
    out = tmp_path / f'delay{delay}'
    argv = [*TINY_PRETRAIN_FLAGS, '--data_path', demo_root / 'train', '--epochs', '2', '--output_dir', out,
            '--log_dir', out / 'tb', '--vis_freq', '0', '--t_0', '0.5']
    monkeypatch.setattr(sys, 'argv', ['run_pretrain.py', *map(str, argv)])
    run_pretrain.run_main(run_pretrain.main, run_pretrain.get_args_parser())
    log = [json.loads(l) for l in (out / 'log.txt').read_text().splitlines()]
    return log, capsys.readouterr().out, out


@pytest.mark.slow
def test_data_bound_note_for_slow_loader_only(demo_root, tmp_path, monkeypatch, capsys):
    fast, fast_out, _ = _train(demo_root, tmp_path, monkeypatch, capsys, 0)
    slow, slow_out, slow_dir = _train(demo_root, tmp_path, monkeypatch, capsys, 0.4)
    for log in (fast, slow):
        assert [r['epoch'] for r in log] == [0, 1]
        for r in log:
            assert 0.0 <= r['train_data_wait_share'] <= 1.0
            assert r['train_data_wait_time'] <= r['train_epoch_time']
    # 4 batches per epoch, 0.4 s extra each: >= 1.6 s of waiting, against ~0.3-2.5 s of compute (idle / loaded box)
    assert slow[1]['train_data_wait_time'] >= 1.6 - 0.05
    assert slow[1]['train_data_wait_share'] > 0.10
    assert fast[1]['train_data_wait_share'] < 0.10
    assert slow[1]['train_data_wait_time'] - fast[1]['train_data_wait_time'] >= 1.6 - 0.1
    notes = [l for l in slow_out.splitlines() if 'data-bound' in l]
    assert len(notes) == 1, slow_out[-2000:]
    assert notes[0].startswith('note: data-bound: epoch 1 waited for data') and '--num_workers (now 0' in notes[0]
    assert 'FreezeOut' in notes[0] and 'pre-resize' in notes[0]
    assert not any('data-bound' in l for l in fast_out.splitlines())
    # TensorBoard has the share per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(slow_dir / 'tb'))
    acc.Reload()
    vals = [e.value for e in acc.Scalars('perf/data_wait_share')]
    assert len(vals) == 2 and vals[1] == pytest.approx(slow[1]['train_data_wait_share'], rel=1e-6)
