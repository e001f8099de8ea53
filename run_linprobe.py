"""Linear probing of a frozen pre-trained encoder (MAE ``main_linprobe`` recipe, LOCALMIM.md §4).

    torchrun --nproc_per_node=8 run_linprobe.py --batch_size 2048 --model vit_base_patch16 \\
        --finetune PRETRAIN/checkpoint-99.pth --epochs 90 --warmup_epochs 10 --blr 0.1 --weight_decay 0.0 \\
        --dist_eval --data_path /path/to/imagenet --output_dir OUT --log_dir OUT
    python run_linprobe.py --demo --finetune DEMO_PRETRAIN/checkpoint-N.pth

The encoder never trains: it runs in eval mode under ``no_grad`` and only the head, BatchNorm1d(D, affine=False,
eps 1e-6) + Linear, learns (BN = parameter-free feature standardisation, statistics per process as in MAE).
Features: the cls token after the final norm (LocalMIM: the last stage norm); ``--global_pool`` uses the mean
patch token through a fresh, frozen ``fc_norm`` instead (MAE semantics; the BN after it re-standardises anyway).
"""
import argparse

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.optim import Lars

import checkpoint_formats
from engine_finetune import evaluate, fit
from eval_common import add_eval_args, add_model_args, build_datasets, build_loaders, \
    build_model, checkpoints_for, demo_defaults, init_run, lr_setup, prepare_args, restore, wrap_ddp
from util import distributed as du
from util.amp import make_amp
from util.args import ArgumentParser, add_common_args, add_optim_args, run_main
from util.datasets import linprobe_transform
from util.errors import check
from util.log import TensorBoard

DEMO_DEFAULTS = demo_defaults('linprobe')


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser('MAE/LocalMIM linear probing for image classification', add_help=False)
    add_optim_args(parser, title='optimizer (LARS) and schedule', batch_size=512, epochs=90, blr=0.1, min_lr=0.0,
                   warmup_epochs=10, weight_decay=0.0, weight_decay_help='LARS weight decay on the linear weight',
                   batch_note='; MAE used 16384 in total')
    add_model_args(parser, drop_path=None)
    add_eval_args(parser, title='initialisation and evaluation',
                  finetune_help='pre-training checkpoint whose encoder is probed (without it: a random encoder); '
                                'checkpoints in --output_dir (auto-resume) take precedence',
                  global_pool=False,
                  pool_help='probe the mean patch token (fresh fc_norm) instead of the cls token (default: off)',
                  cls_help='probe the cls token after the final norm (default)',
                  dist_eval_help='split the val set over processes without padding (exact, faster)')
    add_common_args(parser, output_dir='./output/linprobe', num_workers=10, save_freq=10)
    return parser


class LinearProbe(nn.Module):
    """A frozen timm ViT (``num_classes=0``) plus a BN(affine=False) + Linear head; logits [B, C] from [B,3,H,W].

    ``train()`` keeps the encoder in eval mode (the BN head alone switches), so no dropout/drop-path or running
    statistics of the encoder ever change, and the forward builds no graph through it.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, init_std: float = 0.01):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        dim = encoder.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=init_std)  # MoCo v3 / MAE probe init
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> 'LinearProbe':
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
        return self.head(feats)


def lars_optimizer(probe: LinearProbe, weight_decay: float) -> Lars:
    """timm ``Lars`` configured as the MoCo-v3 LARS of MAE's probe (LOCALMIM.md §4.2).

    MoCo-v3, for tensors with ndim > 1: g ← g + wd·p, g ← g · η‖p‖/‖g‖ (1 if a norm is 0), μ ← m·μ + g,
    p ← p − lr·μ; 1-D tensors get neither decay nor scaling. timm: q = η‖p‖/(‖g‖ + wd‖p‖ + eps) from the raw
    gradient, then (g + wd·p)·q, the same momentum (its first buffer = g equals MoCo's zero-initialised one), and
    scaling only where ``weight_decay != 0 or always_adapt``. So with ``always_adapt`` on the weight group and the
    bias in a group with wd 0 and no adaptation, the two are equal at wd = 0 (the recipe) up to eps = 1e-8; with
    wd > 0 timm's denominator ‖g‖ + wd‖p‖ ≥ ‖g + wd·p‖ makes steps slightly smaller.
    """
    lin = probe.head[1]
    groups = [dict(params=[lin.weight], weight_decay=weight_decay, always_adapt=True),
              dict(params=[lin.bias], weight_decay=0.0, always_adapt=False)]
    return Lars(groups, lr=0.0, momentum=0.9, trust_coeff=0.001)


def main(args: argparse.Namespace) -> None:
    prepare_args(args, DEMO_DEFAULTS)
    device = init_run(args)
    resume, pre = checkpoints_for(args)  # first: the checkpoint may set --input_size
    train_set, val_set, nb_classes = build_datasets(args, linprobe_transform(True, args.input_size),
                                                    linprobe_transform(False, args.input_size))
    encoder = build_model(args, 0, 'avg' if args.global_pool else 'token')
    if pre is not None:
        checkpoint_formats.load_pretrained(encoder, args.finetune, head_init_std=None, ckpt=pre)
    elif resume is None:
        du.print0('no --finetune: probing a randomly initialised encoder (a baseline, not a result)')
    model = LinearProbe(encoder, nb_classes).to(device)
    amp = make_amp(device, args.amp)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    du.print0(f'model {args.model} ({"mean patch token" if args.global_pool else "cls token"}): '
              f'{n_parameters} trainable head parameters; precision {amp.name}')
    train_loader, val_loader = build_loaders(args, train_set, val_set, train_kind='linprobe')
    if args.eval:
        check(resume is not None, '--eval needs a trained probe: pass --resume CKPT or an --output_dir with '
                                  'checkpoints')
        restore(resume, model, None, None, args)
        evaluate(model, val_loader, device, amp)
        return

    model_ddp = wrap_ddp(model, args, device)
    schedule, spe = lr_setup(args, len(train_loader))
    optimizer = lars_optimizer(model, args.weight_decay)
    max_acc = restore(resume, model, optimizer, amp.scaler, args) if resume else 0.0
    tb = TensorBoard(args.log_dir)
    fit(model_ddp, model, nn.CrossEntropyLoss(), optimizer, amp, schedule, spe, train_loader, val_loader, device,
        args, tb, None, max_acc, n_parameters)
    tb.close()
    du.cleanup()


if __name__ == '__main__':
    run_main(main, ArgumentParser('MAE/LocalMIM linear probing', parents=[get_args_parser()]))
