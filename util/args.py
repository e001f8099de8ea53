"""Flag groups shared by the four scripts (data, output/logging, checkpoint/resume, runtime), plus ``--demo``.

Each script keeps its own method flags in its ``get_args_parser()``; these are the ones that mean the same thing
everywhere. Defaults follow MAE/LocalMIM unless a help string says otherwise.
"""
import argparse
import os
import sys
from typing import Dict, Iterable, List

from util.distributed import add_distributed_args
from util.errors import UserError


def str2bool(v: str) -> bool:
    if v.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if v.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true/false, got {v!r}')


def add_common_args(parser: argparse.ArgumentParser, *, output_dir: str, num_workers: int = 10) -> None:
    g = parser.add_argument_group('data, output and runtime')
    g.add_argument('--data_path', default='./dataset/ImageNet/', type=str,
                   help='ImageNet-style root holding train/ (and val/) class folders, or (pre-training) a class-'
                        'folder root itself')
    g.add_argument('--output_dir', default=output_dir, type=str,
                   help=f"checkpoints and log.txt go here; '' disables saving (default: {output_dir})")
    g.add_argument('--log_dir', default=None, type=str,
                   help='TensorBoard event directory; TensorBoard is off if unset (default: None)')
    g.add_argument('--device', default='cuda', type=str,
                   help='cuda or cpu; falls back to cpu with a warning when CUDA is absent and the flag was not '
                        'given explicitly (default: cuda)')
    g.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'],
                   help='mixed precision: auto = bf16 on CUDA if supported else fp16 with loss scaling; '
                        'CPU runs in fp32 (default: auto)')
    g.add_argument('--seed', default=0, type=int, help='random seed; each rank uses seed + rank (default: 0)')
    g.add_argument('--resume', default='', type=str, help='checkpoint to resume from (model, optimizer, epoch, ...)')
    g.add_argument('--auto_resume', action='store_true', default=True,
                   help='resume from the newest loadable checkpoint in --output_dir (default: on)')
    g.add_argument('--no_auto_resume', action='store_false', dest='auto_resume',
                   help='start from scratch even if --output_dir holds checkpoints')
    g.add_argument('--start_epoch', default=0, type=int, metavar='N',
                   help='first epoch (overwritten by the checkpoint when resuming) (default: 0)')
    g.add_argument('--save_freq', default=None, type=int,
                   help='write checkpoint-N.pth every N epochs and at the last epoch; checkpoint-last.pth is '
                        'written every epoch for pre-emption (default: per script)')
    g.add_argument('--keep_last', default=0, type=int,
                   help='keep only the K newest checkpoint-N.pth files; 0 keeps all (default: 0)')
    g.add_argument('--num_workers', default=num_workers, type=int,
                   help=f'data-loading worker processes per GPU/process (default: {num_workers})')
    g.add_argument('--pin_mem', action='store_true',
                   help='pin CPU memory in the DataLoader for faster host-to-GPU copies (default: on with CUDA)')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)
    g.add_argument('--bad_images', default='fail', choices=['fail', 'skip'],
                   help='an unreadable image in the dataset: fail naming the file, or skip it with a warning '
                        '(default: fail)')
    g.add_argument('--debug', action='store_true',
                   help='smoke run: a handful of iterations per epoch with per-step logging')
    g.add_argument('--demo', action='store_true',
                   help='use the built-in procedurally generated demo ImageFolder and tiny defaults; flags given '
                        'explicitly still win')
    add_distributed_args(parser)


def explicit_flags(argv: Iterable[str]) -> List[str]:
    """Destination-like names of the flags present on the command line (``--foo=1`` and ``--foo 1`` alike)."""
    out = []
    for a in argv:
        if a.startswith('--'):
            out.append(a[2:].split('=', 1)[0].replace('-', '_'))
    return out


def apply_demo_defaults(args: argparse.Namespace, defaults: Dict[str, object], argv: List[str]) -> None:
    """Overlay ``defaults`` on ``args`` for every flag the user did not type (``--demo`` mode)."""
    given = set(explicit_flags(argv))
    for k, v in defaults.items():
        if k not in given:
            setattr(args, k, v)


def resolve_device_flag(args: argparse.Namespace, argv: List[str]) -> None:
    """MAE's ``--device cuda`` default would make every CPU-only run fail; fall back unless the user insisted."""
    import torch
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        if 'device' in explicit_flags(argv):
            raise UserError(f'--device {args.device}: CUDA is not available on this machine; pass --device cpu')
        print('CUDA not available: running on CPU (pass --device cpu to silence this)', flush=True)
        args.device = 'cpu'


def check_output_dir(path: str, flag: str = '--output_dir') -> None:
    """Create ``path`` (if set) and check it is writable, with one clear error otherwise."""
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f'{flag} {path}: cannot create directory ({e.strerror})') from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {path}: directory is not writable; choose another {flag}')


def run_main(main, parser: argparse.ArgumentParser) -> None:
    """Parse, run ``main(args)``, and turn UserError into one line on stderr with exit status 2."""
    argv = sys.argv[1:]

    def _one_line_error(message: str) -> None:  # argparse would print the whole usage block first
        print(f'error: {message} (see --help)', file=sys.stderr, flush=True)
        sys.exit(2)
    parser.error = _one_line_error
    args = parser.parse_args(argv)
    args.argv = argv
    from util import signals
    try:
        main(args)
    except UserError as e:
        print(f'error: {one_line(str(e))}', file=sys.stderr, flush=True)
        sys.exit(2)
    except signals.TrainingStopped as e:  # Interrupted (SIGINT/SIGTERM), NonFiniteLoss: nothing half-done written
        _stopped(e, args)
    except KeyboardInterrupt:  # SIGINT outside a training loop (start-up, evaluation): nothing is being written
        _stopped(signals.Interrupted(2), args)
    except Exception:  # e.g. a DataLoader worker killed by the same Ctrl-C: report the signal, not the crash
        if signals.pending_signal() is None:
            raise
        _stopped(signals.Interrupted(signals.pending_signal()), args)


def _stopped(e: Exception, args: argparse.Namespace) -> None:
    from util import distributed as du
    from util import signals
    if isinstance(e, signals.Interrupted):
        msg = signals.interrupted_message(e, args)
    else:
        msg = f'error: {one_line(str(e))}'
    if du.is_main_process():
        print(msg, file=sys.stderr, flush=True)
    sys.exit(getattr(e, 'exit_code', 1))


def one_line(msg: str) -> str:
    """A DataLoader worker re-raises our error wrapped in its traceback text: keep the original message only."""
    if 'Original Traceback' in msg:
        last = [l for l in msg.strip().splitlines() if l.strip()][-1]
        return last.split('UserError: ', 1)[-1]
    return msg
