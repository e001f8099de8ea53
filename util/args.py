"""Flag groups shared by the four scripts, each declared once with per-script defaults passed in: optimisation
(batch, epochs, LR schedule), model shape, data/output/runtime, checkpoint/resume, plus ``--demo``.

Each script keeps its own method flags in its ``get_args_parser()`` and adds only the groups that act there (e.g.
``run_knn.py`` trains nothing, so it has no checkpoint/resume flags). Defaults follow MAE/LocalMIM unless a help
string says otherwise.
"""
import argparse
import os
import sys
from typing import Dict, Iterable, List, Optional

from util.distributed import add_distributed_args
from util.errors import UserError


def str2bool(v: str) -> bool:
    if v.lower() in ('1', 'true', 'yes', 'on'):
        return True
    if v.lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true/false, got {v!r}')


def add_optim_args(parser: argparse.ArgumentParser, *, title: str, batch_size: int, epochs: int, blr: float,
                   min_lr: float, warmup_epochs: int, weight_decay: float, weight_decay_help: str,
                   batch_note: str = '', blr_note: str = '', min_lr_note: str = '') -> argparse._ArgumentGroup:
    """Batch, epochs, accumulation, LR schedule and weight decay: the same flags in the three training scripts,
    each with its own defaults (and optimizer wording for ``--weight_decay``). Returns the group for more flags."""
    g = parser.add_argument_group(title)
    g.add_argument('--batch_size', default=batch_size, type=int,
                   help=f'images per GPU/process per iteration; effective batch = batch_size * accum_iter * world '
                        f'size (default: {batch_size}{batch_note})')
    g.add_argument('--epochs', default=epochs, type=int, help=f'training epochs (default: {epochs})')
    g.add_argument('--accum_iter', default=1, type=int,
                   help='micro-batches accumulated per optimizer step, to reach a large effective batch on few GPUs '
                        '(default: 1)')
    g.add_argument('--weight_decay', default=weight_decay, type=float,
                   help=f'{weight_decay_help} (default: {weight_decay})')
    g.add_argument('--lr', default=None, type=float, metavar='LR',
                   help='absolute peak learning rate; overrides --blr (default: None)')
    g.add_argument('--blr', default=blr, type=float, metavar='LR',
                   help=f'base learning rate per 256 images: lr = blr * effective batch / 256 (default: {blr}'
                        f'{blr_note})')
    g.add_argument('--min_lr', default=min_lr, type=float, metavar='LR',
                   help=f'final learning rate of the cosine schedule{min_lr_note} (default: {min_lr})')
    g.add_argument('--warmup_epochs', default=warmup_epochs, type=int, metavar='N',
                   help=f'epochs of linear warm-up from 0, counted in optimizer steps (default: {warmup_epochs})')
    return g


def add_arch_args(g: argparse._ArgumentGroup, *, model_default, model_help: str, source: str,
                  input_source: str = '224') -> None:
    """--model, --input_size and the shape overrides of the pre-training and evaluation models. ``source`` says
    where an override's default comes from (e.g. "the model's, or the checkpoint's")."""
    g.add_argument('--model', default=model_default, type=str, metavar='NAME', help=model_help)
    g.add_argument('--input_size', default=224, type=int, help=f'square image side in pixels (default: {input_source})')
    g.add_argument('--patch_size', default=None, type=int, help=f'patch side in pixels (default: {source})')
    g.add_argument('--embed_dim', default=None, type=int, help=f'encoder width (default: {source})')
    g.add_argument('--depth', default=None, type=int, help=f'encoder blocks (default: {source})')
    g.add_argument('--num_heads', default=None, type=int, help=f'attention heads (default: {source})')


def add_common_args(parser: argparse.ArgumentParser, *, output_dir: str, num_workers: int = 10,
                    save_freq: Optional[int] = None) -> None:
    """Data, output and runtime flags of every script; with ``save_freq`` (a script that trains and checkpoints)
    also the checkpoint/resume flags and --debug."""
    g = parser.add_argument_group('data, output and runtime')
    g.add_argument('--data_path', default='./dataset/ImageNet/', type=str,
                   help='ImageNet-style root holding train/ (and val/) class folders, or (pre-training) a class-'
                        'folder root itself')
    what = 'checkpoints and log.txt go' if save_freq is not None else 'log.txt goes'
    g.add_argument('--output_dir', default=output_dir, type=str,
                   help=f"{what} here; '' disables saving (default: {output_dir})")
    g.add_argument('--log_dir', default=None, type=str,
                   help='TensorBoard event directory; TensorBoard is off if unset (default: None)')
    g.add_argument('--device', default='cuda', type=str,
                   help='cuda or cpu; falls back to cpu with a warning when CUDA is absent and the flag was not '
                        'given explicitly (default: cuda)')
    g.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'],
                   help='mixed precision: auto = bf16 on CUDA if supported else fp16 with loss scaling; '
                        'CPU runs in fp32 (default: auto)')
    g.add_argument('--seed', default=0, type=int, help='random seed; each rank uses seed + rank (default: 0)')
    g.add_argument('--num_workers', default=num_workers, type=int,
                   help=f'data-loading worker processes per GPU/process (default: {num_workers})')
    g.add_argument('--pin_mem', action='store_true',
                   help='pin CPU memory in the DataLoader for faster host-to-GPU copies (default: on with CUDA)')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)
    g.add_argument('--bad_images', default='fail', choices=['fail', 'skip'],
                   help='an unreadable image in the dataset: fail naming the file, or skip it with a warning '
                        '(default: fail)')
    g.add_argument('--demo', action='store_true',
                   help='use the built-in procedurally generated demo ImageFolder and tiny defaults; flags given '
                        'explicitly still win')
    if save_freq is not None:
        add_checkpoint_args(parser, save_freq)
    add_distributed_args(parser)


def add_checkpoint_args(parser: argparse.ArgumentParser, save_freq: int) -> None:
    g = parser.add_argument_group('checkpoints and resuming')
    g.add_argument('--resume', default='', type=str, help='checkpoint to resume from (model, optimizer, epoch, ...)')
    g.add_argument('--auto_resume', action='store_true', default=True,
                   help='resume from the newest loadable checkpoint in --output_dir (default: on)')
    g.add_argument('--no_auto_resume', action='store_false', dest='auto_resume',
                   help='start from scratch even if --output_dir holds checkpoints')
    g.add_argument('--start_epoch', default=0, type=int, metavar='N',
                   help='first epoch (overwritten by the checkpoint when resuming) (default: 0)')
    g.add_argument('--save_freq', default=save_freq, type=int,
                   help=f'write checkpoint-N.pth every N epochs and at the last epoch; checkpoint-last.pth is '
                        f'written every epoch for pre-emption (default: {save_freq})')
    g.add_argument('--keep_last', default=0, type=int,
                   help='keep only the K newest checkpoint-N.pth files; 0 keeps all (default: 0)')
    g.add_argument('--debug', action='store_true',
                   help='smoke run: a handful of iterations per epoch with per-step logging')


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
