"""bench/gpu_check.py's CPU dry run (--quick --allow_cpu): every part runs its real commands on CPU and passes, so
the one-command GPU check cannot go stale without CI noticing (the GPU run itself is done by hand)."""
import json

import pytest


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_passes(tmp_path, monkeypatch):
    torch = pytest.importorskip('torch')
    if torch.cuda.is_available():
        pytest.skip('a GPU is present: run python -m bench.gpu_check by hand')
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    from bench.gpu_check import main
    out = tmp_path / 'gpu_check.json'
    res = main(['--quick', '--allow_cpu', '--timeout_scale', '10', '--json', str(out)])
    parts = {p['part']: p for p in json.loads(out.read_text())['parts']}
    assert set(parts) == {'ddp', 'amp_bf16', 'amp_fp16', 'compile', 'finetune', 'prefix_cache', 'flops',
                          'step_eager', 'step_compile', 'supply_demand'}
    failed = {k: (p.get('why'), p.get('stderr_tail', '')[-800:]) for k, p in parts.items() if not p['ok']}
    assert not failed and res['all_ok'], failed
    assert parts['ddp']['processes'] == 2 and parts['ddp']['resume_exact'] and parts['ddp']['freeze_lines'] > 0
    assert len(parts['amp_bf16']['peak_mem_mb']) == 3 and parts['amp_bf16']['frozen_units'][-1] > 0
    assert 0 < parts['compile']['compile_graphs'][-1] <= 16
    assert parts['prefix_cache']['bit_identical'] and parts['prefix_cache']['served_share'][-1] > 0
    assert [r['gpus'] for r in parts['supply_demand']['table']] == [1, 2, 4, 8]
    assert {'pil', 'pil_prepared'} <= set(parts['supply_demand']['supply'])
