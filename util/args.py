"""Flag groups shared by the four scripts, each declared once with per-script defaults passed in: optimisation
(batch, epochs, LR schedule), model shape, data/output/runtime, checkpoint/resume, plus ``--demo``.

Each script keeps its own method flags in its ``get_args_parser()`` and adds only the groups that act there (e.g.
``run_knn.py`` trains nothing, so it has no checkpoint/resume flags). Defaults follow MAE/LocalMIM unless a help
string says otherwise.
"""
import argparse
import math
import os
import re
import sys
from typing import Callable, Dict, Iterable, List, Optional

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
                        f'size (default: {batch_size}{batch_note})', domain=integer(1), defines_run=True)
    g.add_argument('--epochs', default=epochs, type=int, help=f'training epochs (default: {epochs})',
                   domain=integer(1), defines_run=True)
    g.add_argument('--accum_iter', default=1, type=int,
                   help='micro-batches accumulated per optimizer step, to reach a large effective batch on few GPUs '
                        '(default: 1)', domain=integer(1), defines_run=True)
    g.add_argument('--weight_decay', default=weight_decay, type=float,
                   help=f'{weight_decay_help} (default: {weight_decay})', domain=real(0), defines_run=True)
    g.add_argument('--lr', default=None, type=float, metavar='LR',
                   help='absolute peak learning rate; overrides --blr (default: None)',
                   domain=real(0, lo_open=True), defines_run=True)
    g.add_argument('--blr', default=blr, type=float, metavar='LR',
                   help=f'base learning rate per 256 images: lr = blr * effective batch / 256 (default: {blr}'
                        f'{blr_note})', domain=real(0, lo_open=True), defines_run=True)
    g.add_argument('--min_lr', default=min_lr, type=float, metavar='LR',
                   help=f'final learning rate of the cosine schedule{min_lr_note} (default: {min_lr})',
                   domain=real(0), defines_run=True)
    g.add_argument('--warmup_epochs', default=warmup_epochs, type=int, metavar='N',
                   help=f'epochs of linear warm-up from 0, counted in optimizer steps (default: {warmup_epochs})',
                   domain=integer(0), defines_run=True)
    return g


def add_arch_args(g: argparse._ArgumentGroup, *, model_default, model_help: str, source: str,
                  input_source: str = '224') -> None:
    """--model, --input_size and the shape overrides of the pre-training and evaluation models. ``source`` says
    where an override's default comes from (e.g. "the model's, or the checkpoint's")."""
    g.add_argument('--model', default=model_default, type=str, metavar='NAME', help=model_help, defines_run=True)
    g.add_argument('--input_size', default=224, type=int, help=f'square image side in pixels (default: {input_source})',
                   domain=integer(1, 8192), defines_run=True)
    g.add_argument('--patch_size', default=None, type=int, help=f'patch side in pixels (default: {source})',
                   domain=integer(1, 8192), defines_run=True)
    g.add_argument('--embed_dim', default=None, type=int, help=f'encoder width (default: {source})',
                   domain=integer(1))
    g.add_argument('--depth', default=None, type=int, help=f'encoder blocks (default: {source})', domain=integer(1))
    g.add_argument('--num_heads', default=None, type=int, help=f'attention heads (default: {source})',
                   domain=integer(1))


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
                        'given explicitly (default: cuda)', domain=check_device)
    g.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'fp16', 'none'],
                   help='mixed precision: auto = bf16 on CUDA if supported else fp16 with loss scaling; '
                        'CPU runs in fp32 (default: auto)')
    g.add_argument('--seed', default=0, type=int, help='random seed; each rank uses seed + rank (default: 0)',
                   domain=integer(0, 2147483647), defines_run=True)
    g.add_argument('--num_workers', default=num_workers, type=int,
                   help=f'data-loading worker processes per GPU/process (default: {num_workers})',
                   domain=integer(0, 1024))
    g.add_argument('--pin_mem', action='store_true',
                   help='pin CPU memory in the DataLoader for faster host-to-GPU copies (default: on with CUDA)')
    g.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)
    g.add_argument('--data_backend', default='pil', choices=['pil', 'dali'],
                   help='image decoding and augmentation: pil = torchvision DataLoader; dali = NVIDIA DALI '
                        '(decode on the GPU with CUDA, else on the CPU; optional: pip install -r '
                        'requirements-dali.txt; util/dali_loader.py lists what differs) (default: pil)',
                   defines_run=True)
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
                   help='start from scratch; refused if --output_dir holds checkpoints, unless --overwrite')
    g.add_argument('--overwrite', action='store_true',
                   help='starting from scratch in an --output_dir that holds checkpoints of another run: move them '
                        '(and log.txt, run.json) into <output_dir>/previous-<UTC time>/ instead of refusing to start '
                        '(default: off)')
    g.add_argument('--start_epoch', default=0, type=int, metavar='N',
                   help='first epoch (overwritten by the checkpoint when resuming) (default: 0)', domain=integer(0))
    g.add_argument('--save_freq', default=save_freq, type=int,
                   help=f'write checkpoint-N.pth every N epochs and at the last epoch; checkpoint-last.pth is '
                        f'written every epoch for pre-emption (default: {save_freq})', domain=integer(1))
    g.add_argument('--keep_last', default=0, type=int,
                   help='keep only the K newest checkpoint-N.pth files; 0 keeps all (default: 0)', domain=integer(0))
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


def parse_script_args(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """A script's command line as ``run_main`` parses it: plugin flags added (``--freeze_policy module:Class``),
    domains and paths checked (one ``error:`` line, exit 2), ``args.argv`` kept (demo defaults, resume checks)."""
    def _one_line_error(message: str) -> None:  # argparse would print the whole usage block first
        print(f'error: {message} (see --help)', file=sys.stderr, flush=True)
        sys.exit(2)
    parser.error = _one_line_error
    from util.plugins import extend_parser
    try:
        extend_parser(parser, argv)
    except UserError as e:
        _one_line_error(str(e))
    args = parser.parse_args(argv)
    check_flags(args, parser, argv)
    args.argv = list(argv)
    args.run_defining = run_defining(parser)
    return args


def run_main(main, parser: argparse.ArgumentParser) -> None:
    """Parse, run ``main(args)``, and turn UserError into one line on stderr with exit status 2."""
    args = parse_script_args(parser, sys.argv[1:])
    from util import signals
    old_handlers = signals.install_default_handlers()
    try:
        _run_guarded(main, args)
    finally:  # in-process callers (tests) get their signal handlers back and the output folder unlocked
        import signal as _signal
        from util import rundir
        rundir.release_all()
        for s, h in old_handlers.items():
            _signal.signal(s, h)


def _run_guarded(main, args: argparse.Namespace) -> None:
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
        if e.resume_hint:
            from util.checkpoint import resume_hint
            msg += f'. {resume_hint(args)}'
    if du.is_main_process():
        print(msg, file=sys.stderr, flush=True)
    sys.exit(getattr(e, 'exit_code', 1))


def one_line(msg: str) -> str:
    """A DataLoader worker re-raises our error wrapped in its traceback text: keep the original message only."""
    if 'Original Traceback' in msg:
        last = [l for l in msg.strip().splitlines() if l.strip()][-1]
        return last.split('UserError: ', 1)[-1]
    return msg


# ---------------------------------------------------------------------------------------------------------------
# Flag domains: declared with each flag (``add_argument(..., domain=...)`` on a util.args.ArgumentParser) and checked
# at parse time, before any work (no data scan, no model, no file written). A numeric flag declared without one fails
# tests/test_flag_domains.py (and, at parse time, reports itself as a bug).

_INF = float('inf')


class Domain:
    """Valid values of one numeric flag: a (half-)open or closed interval, integer or real; None passes (unset)."""

    def __init__(self, kind: type, lo: float = -_INF, hi: float = _INF, lo_open: bool = False,
                 hi_open: bool = False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(x)
        finite = ' and finite' if self.kind is float else ''
        if self.lo > -_INF and self.hi < _INF:
            return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo > -_INF:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}{finite}"
        if self.hi < _INF:
            return f"{'<' if self.hi_open else '<='} {num(self.hi)}{finite}"
        return 'finite'

    def contains(self, v: float) -> bool:
        if self.kind is float and not math.isfinite(v):
            return False
        if v < self.lo or (self.lo_open and v == self.lo):
            return False
        return not (v > self.hi or (self.hi_open and v == self.hi))

    def bad_values(self) -> List[str]:
        """Out-of-domain command-line values (for the flag-domain walk in the tests)."""
        bad = []
        if self.lo > -_INF:
            bad.append(str(self.kind(self.lo) if self.lo_open else self.kind(self.lo - 1)))
        if self.hi < _INF:
            bad.append(str(self.kind(self.hi) if self.hi_open else self.kind(self.hi + 1)))
        bad.append('nan' if self.kind is float else '1.5')
        return bad


def integer(lo: float = -_INF, hi: float = _INF) -> Domain:
    """Integers in [lo, hi]."""
    return Domain(int, lo, hi)


def real(lo: float = -_INF, hi: float = _INF, lo_open: bool = False, hi_open: bool = False) -> Domain:
    """Finite reals in the interval (open ends as given)."""
    return Domain(float, lo, hi, lo_open, hi_open)


_int, _real = integer, real
PROB = _PROB = real(0.0, 1.0)

_DEVICE = re.compile(r'^(cpu|cuda(:\d+)?|mps)$')


def _choice(flag: str, value: str, allowed: Iterable[str]) -> Optional[str]:
    allowed = list(allowed)
    return None if value in allowed else f"{flag} {value!r}: must be one of {', '.join(allowed)}"


def one_of(*allowed: str) -> Callable[[str, str], Optional[str]]:
    """A string domain: one of ``allowed`` (for flags whose vocabulary argparse ``choices`` would not show well)."""
    return lambda flag, value: _choice(flag, value, allowed)


def check_device(flag: str, value: str) -> Optional[str]:
    return None if _DEVICE.match(value) else f'{flag} {value!r}: must be cpu, cuda, cuda:N or mps'


def check_aa(flag: str, value: str) -> Optional[str]:
    """The timm policy string must parse (else the first training batch raises deep inside timm)."""
    if value in (None, '', 'none', 'None'):
        return None
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    build = {'rand': rand_augment_transform, 'augmix': augment_and_mix_transform}.get(value.split('-')[0],
                                                                                       auto_augment_transform)
    try:
        build(value, {'translate_const': 100, 'img_mean': (124, 116, 104)})
    except Exception:  # noqa: BLE001 - timm raises AssertionError/KeyError/ValueError for unknown policies
        return (f"{flag} {value!r}: not a timm auto-augment policy; use e.g. rand-m9-mstd0.5-inc1, "
                f"original, v0, augmix-m5-w4-d2 or none")
    return None


_TARGET = re.compile(r'^([A-Za-z_]\w*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$')


def check_targets(flag: str, value: str) -> Optional[str]:
    """Syntax of --target / --stage_targets (a name or module:Class each); the names are resolved by targets.py
    when the model is built (util imports nothing above it)."""
    items = [s.strip() for s in value.split(',')] if flag == '--stage_targets' else [value.strip()]
    bad = next((s for s in items if not _TARGET.match(s)), None)
    if bad is not None:
        return (f"{flag} {value!r}: {bad!r} is neither a target name (hog, pixel, ...) nor module:Class"
                + (' (comma list, one per stage)' if flag == '--stage_targets' else ''))
    return None




class _Declaring:
    """``add_argument(..., domain=None, defines_run=False)``: every flag is declared once, with its help, its
    domain (a :class:`Domain` for numbers, a ``check(flag, value) -> message or None`` for strings; checked at parse
    time by :func:`domain_errors`) and whether it defines the run (:func:`run_defining`: a resume with another value
    is warned about, sweeps and auto-resume compare them)."""

    def add_argument(self, *args, domain=None, defines_run: bool = False, **kwargs):
        action = super().add_argument(*args, **kwargs)
        action.domain, action.defines_run = domain, bool(defines_run)
        return action


class _Group(_Declaring, argparse._ArgumentGroup):
    pass


class ArgumentParser(_Declaring, argparse.ArgumentParser):
    """The project's parser: declaring groups (see :class:`_Declaring`) and no abbreviations (``--resum`` is not
    ``--resume``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = _Group(self, *args, **kwargs)
        self._action_groups.append(group)
        return group


def domain_of(action: argparse.Action):
    """The domain declared with the flag (None: none declared)."""
    return getattr(action, 'domain', None)


def run_defining(parser: argparse.ArgumentParser) -> List[str]:
    """Destinations of the flags declared ``defines_run`` (plugin flags count: they shape their plugin)."""
    return sorted({a.dest for a in parser._actions if getattr(a, 'defines_run', False) or getattr(a, 'plugin', False)})


def numeric_actions(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    """The parser's options whose values are numbers (``type=int``/``float``, any ``nargs``)."""
    return [a for a in parser._actions if a.option_strings and a.type in (int, float)]


def domain_errors(args: argparse.Namespace, parser: argparse.ArgumentParser,
                  argv: Optional[List[str]] = None) -> List[str]:
    """Every violated domain or cross-flag rule, as one message each (naming flag, value and valid range).

    A cross-flag rule is checked when the flag it names was typed (``argv``; None: always): a default that only
    disagrees with another flag (``--epochs 1`` against the default 40 warm-up epochs, ``--demo`` values applied
    later) is the script's business, not a user error.
    """
    errors = []
    for a in parser._actions:
        if not a.option_strings or not hasattr(args, a.dest):
            continue
        flag, value = a.option_strings[0], getattr(args, a.dest)
        if value is None or isinstance(value, bool):
            continue
        dom = domain_of(a)
        if a.type in (int, float):
            if dom is None and getattr(a, 'plugin', False):
                continue  # a plugin's own flag (util.plugins) without a declared domain: its class checks it
            if dom is None:
                errors.append(f'{flag}: no domain declared with the flag (add_argument(..., domain=...); a bug, '
                              f'please report it)')
                continue
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if not dom.contains(v):
                    errors.append(f'{flag} {v}: must be {dom.describe()}')
                    break
        elif callable(dom) and isinstance(value, str):
            msg = dom(flag, value)
            if msg:
                errors.append(msg)
    errors += _relation_errors(args, None if argv is None else set(explicit_flags(argv)))
    return errors


def _relation_errors(args: argparse.Namespace, typed: Optional[set] = None) -> List[str]:
    """Rules between flags (each side already in its domain), for the flags in ``typed`` (None: all)."""
    def _given(*names: str) -> bool:
        return (typed is None or names[0] in typed) and all(getattr(args, n, None) is not None for n in names)
    out = []
    if _given('warmup_epochs', 'epochs') and args.warmup_epochs > args.epochs:
        out.append(f'--warmup_epochs {args.warmup_epochs}: must be in [0, --epochs {args.epochs}]')
    if _given('start_epoch', 'epochs') and args.start_epoch >= args.epochs:
        out.append(f'--start_epoch {args.start_epoch}: must be in [0, --epochs {args.epochs}) (epochs are 0-based)')
    if _given('num_heads', 'embed_dim') and args.embed_dim % args.num_heads:
        out.append(f'--num_heads {args.num_heads}: must divide --embed_dim {args.embed_dim}')
    mm = getattr(args, 'cutmix_minmax', None)
    if mm is not None and (len(mm) != 2 or not mm[0] < mm[1]):
        out.append(f"--cutmix_minmax {' '.join(map(str, mm))}: must be two numbers MIN MAX with 0 <= MIN < MAX <= 1")
    return out


def path_errors(args: argparse.Namespace) -> List[str]:
    """Paths that cannot work, found before any work starts (existence of inputs, kind of outputs)."""
    out = []

    def blocked_by_file(path: str) -> Optional[str]:
        """The first existing non-directory on the way to ``path`` (``path`` itself included)."""
        p = os.path.abspath(path)
        while True:
            if os.path.exists(p):
                return None if os.path.isdir(p) else p
            parent = os.path.dirname(p)
            if parent == p:
                return None
            p = parent

    for dest in ('output_dir', 'log_dir', 'dump_features'):
        path = getattr(args, dest, None)
        if path:
            f = blocked_by_file(path)
            if f:
                out.append(f'--{dest} {path}: cannot create directory ({f} is a file); choose another --{dest}')
    for dest in ('resume', 'finetune'):
        path = getattr(args, dest, None)
        if path and not os.path.isfile(path):
            out.append(f'--{dest} {path}: ' + ('is a directory, not a checkpoint file' if os.path.isdir(path)
                                               else 'file not found'))
    lf = getattr(args, 'load_features', None)
    if lf and not os.path.isdir(lf):
        out.append(f'--load_features {lf}: ' + ('is a file; pass the directory written by --dump_features'
                                                if os.path.exists(lf) else 'directory not found'))
    out_dir = getattr(args, 'output_dir', None)
    if out_dir and os.path.isdir(out_dir):
        for name in ('checkpoint-last.pth', 'log.txt'):
            p = os.path.join(out_dir, name)
            if os.path.lexists(p) and not os.path.isfile(p):
                out.append(f'--output_dir {out_dir}: {p} is not a regular file; move it away or choose another '
                           f'--output_dir')
    return out


def check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> None:
    """Domains, cross-flag rules and paths, before ``main`` runs: the first problem as one ``error:`` line, exit 2."""
    problems = domain_errors(args, parser, argv) + path_errors(args)
    if problems:
        print(f'error: {problems[0]}', file=sys.stderr, flush=True)
        sys.exit(2)
