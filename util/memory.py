"""Peak memory per epoch: reset at the start, read at the end, so the memory that freezing frees shows up.

CUDA: the caching allocator's peak (``max_memory_allocated``). CPU (Linux): the process's peak resident set
(VmHWM), which ``/proc/self/clear_refs`` resets; elsewhere the lifetime peak (``ru_maxrss``), as a fallback.
"""
import resource

import torch


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # "reset the peak resident set size" (Linux >= 4.0)
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since the last :func:`reset_peak_memory`, in MiB."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
