"""Weighted k-NN evaluation of a pre-trained encoder (DINO convention, LOCALMIM.md §5).

    torchrun --nproc_per_node=1 run_knn.py --batch_size 128 --model vit_base_patch16 \\
        --finetune PRETRAIN/checkpoint-99.pth --dist_eval --data_path /path/to/imagenet --output_dir OUT --log_dir OUT
    python run_knn.py --demo --finetune DEMO_PRETRAIN/checkpoint-N.pth
    python run_knn.py --demo                          # random-init encoder: the baseline pre-training must beat

Features: the cls token after the final norm (for LocalMIM, the last stage norm), or with ``--global_pool`` the
mean of the patch tokens after that same norm (no fresh fc_norm: k-NN has nothing to train it). Both splits are
resized to round(input·256/224) and centre-cropped to ``--input_size``; features are extracted in fp32 unless
``--amp`` is given. Output: one line per k, ``k-NN k=20: top-1 71.25 top-5 93.10``, and one JSON line in
``<output_dir>/log.txt`` with ``knn_k{K}_top1`` / ``knn_k{K}_top5``.
"""
import argparse
import os

import torch

import checkpoint_formats
import models_vit
from eval_common import add_eval_args, add_model_args, adopt_checkpoint_arch, build_model, demo_defaults, init_run, \
    prepare_args
from util import distributed as du
from util.amp import make_amp
from util.args import ArgumentParser, add_common_args, explicit_flags, integer, real, run_main
from util.errors import UserError, check
from util.knn import DEFAULT_KS, build_knn_loaders, clipped_ks, format_knn, knn_evaluate, knn_from_features
from util.checkpoint import save_atomic
from util.log import TensorBoard, append_json_log
from util.rundir import new_run_id

DEMO_DEFAULTS = demo_defaults('knn', training=False, batch_size=64)
FEATURE_FILES = ('trainfeat.pth', 'trainlabels.pth', 'testfeat.pth', 'testlabels.pth')  # DINO's names


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('Weighted k-NN evaluation of a pre-trained encoder', add_help=False)
    parser.add_argument('--batch_size', default=128, type=int,
                        help='images per GPU/process during feature extraction; does not change the result '
                             '(default: 128)', domain=integer(1), defines_run=True)
    parser.add_argument('--accum_iter', default=1, type=int, help=argparse.SUPPRESS,
                        domain=integer(1), defines_run=True)  # accepted, as in the seed
    add_model_args(parser, drop_path=None, resumes=False)
    g = add_eval_args(parser, title='k-NN', trains=False,
                      finetune_help='pre-training (or fine-tuning) checkpoint whose encoder is evaluated; without it '
                                    'a randomly initialised encoder is evaluated (the baseline)',
                      global_pool=False,
                      pool_help='use the mean patch token after the final norm instead of the cls token '
                                '(default: off)',
                      cls_help='use the cls token (default)',
                      dist_eval_help='split feature extraction over processes and all-gather (exact); otherwise '
                                     'every process extracts everything')
    g.add_argument('--nb_knn', default=list(DEFAULT_KS), type=int, nargs='+', metavar='K',
                   help='numbers of neighbours; each is clipped to the train-set size (default: 10 20 100 200; '
                        'DINO reports k=20)', domain=integer(1))
    g.add_argument('--temperature', default=0.07, type=float,
                   help='T of the exp(similarity / T) vote weights (default: 0.07)', domain=real(0, lo_open=True))
    g.add_argument('--dump_features', default='', type=str, metavar='DIR',
                   help='save the normalised features and labels to DIR (DINO file names)')
    g.add_argument('--load_features', default='', type=str, metavar='DIR',
                   help='skip the model: run k-NN on features saved by --dump_features')
    add_common_args(parser, output_dir='./output/knn', num_workers=10)
    return parser


def load_features(path: str):
    files = [os.path.join(path, f) for f in FEATURE_FILES]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"--load_features {path}: missing {', '.join(os.path.basename(f) for f in missing)}; "
                        f"write them with --dump_features")
    out = []
    for f in files:
        try:
            t = torch.load(f, map_location='cpu', weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file means "not written by --dump_features"
            raise UserError(f'--load_features {path}: {os.path.basename(f)} is not a saved tensor '
                            f'({(str(e).strip().splitlines() or [type(e).__name__])[0][:120]}); write the features '
                            f'again with --dump_features') from None
        if not torch.is_tensor(t):
            raise UserError(f'--load_features {path}: {os.path.basename(f)} holds a {type(t).__name__}, not a '
                            f'tensor; write the features again with --dump_features')
        out.append(t)
    return out


def encoder_for(args: argparse.Namespace):
    """(encoder, description, checkpoint epoch) — from --finetune, else random init."""
    ckpt = checkpoint_formats.read_checkpoint(args.finetune) if args.finetune else None
    adopt_checkpoint_arch(args, ckpt, f'--finetune {args.finetune}', args.finetune or None)
    model = build_model(args, 0, 'token')
    if ckpt is None:
        du.print0(f'no --finetune: evaluating a randomly initialised {args.model} (seed {args.seed}), the baseline '
                  f'a pre-trained encoder must beat')
        return model, 'random-init', None
    checkpoint_formats.load_pretrained(model, args.finetune, head_init_std=None, ckpt=ckpt)
    return model, args.finetune, ckpt.get('epoch')


def main(args: argparse.Namespace) -> None:
    prepare_args(args, DEMO_DEFAULTS)
    device = init_run(args)
    ks = list(dict.fromkeys(args.nb_knn))
    check(all(k >= 1 for k in ks), f'--nb_knn {args.nb_knn}: every k must be >= 1')
    epoch = None
    if args.load_features:
        train_f, train_y, val_f, val_y = load_features(args.load_features)
        source, n_train, n_val = f'features from {args.load_features}', len(train_y), len(val_y)
        results = knn_from_features(train_f.to(device), train_y.to(device), val_f.to(device), val_y.to(device), ks,
                                    args.temperature)
    else:
        model, source, epoch = encoder_for(args)  # first: the checkpoint may set --input_size
        shard = args.distributed and args.dist_eval
        train_l, val_l = build_knn_loaders(args.data_path, args.input_size, args.batch_size, args.num_workers, shard,
                                           args.pin_mem, args.bad_images, backend=args.data_backend,
                                           seed=args.seed, device=device)
        model.to(device).eval()
        amp = make_amp(device, args.amp if 'amp' in explicit_flags(args.argv) else 'none')
        pool = 'avg' if args.global_pool else 'token'
        what = 'mean patch token' if args.global_pool else 'cls token'
        du.print0(f'k-NN on {len(train_l.dataset)} train / {len(val_l.dataset)} val images, '
                  f'{len(train_l.dataset.classes)} classes; features: {what} after the final norm, {amp.name}; '
                  f'T={args.temperature}')

        def features(x: torch.Tensor) -> torch.Tensor:
            with amp.autocast():
                return models_vit.encoder_features(model, x, pool)
        dump = {} if args.dump_features else None
        results = knn_evaluate(features, train_l, val_l, device, ks, args.temperature, features_out=dump)
        n_train, n_val = len(train_l.dataset), len(val_l.dataset)
        if dump is not None and du.is_main_process():
            os.makedirs(args.dump_features, exist_ok=True)
            for name, key in zip(FEATURE_FILES, ('train_f', 'train_y', 'val_f', 'val_y')):
                save_atomic(dump[key], os.path.join(args.dump_features, name))
            du.print0(f'features written to {args.dump_features}')
    for line in clipped_ks(ks, n_train) + format_knn(results, ks):
        du.print0(line)
    append_json_log(args.output_dir, dict(results, source=source, epoch=epoch, n_train=n_train, n_val=n_val,
                                          features='avg' if args.global_pool else 'cls', temperature=args.temperature,
                                          run_id=new_run_id()))
    tb = TensorBoard(args.log_dir)
    for k, v in results.items():
        tb.scalar(f'knn/{k}', v, epoch or 0)
    tb.close()
    du.cleanup()


if __name__ == '__main__':
    run_main(main, ArgumentParser('Weighted k-NN evaluation', parents=[get_args_parser()]))
