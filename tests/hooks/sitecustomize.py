"""Fault injection for the reliability tests, from outside the production code.

The tests put this directory first on the ``PYTHONPATH`` of the scripts they start (``tests/reliability_common.py``
``env()``), so Python imports this module at start-up in every process, torchrun workers included. Without a
``VITFREEZE_TEST_*`` variable it does nothing. Hooks are installed when the module they patch is first imported:

* ``VITFREEZE_TEST_NAN_AT_STEP=<n>``: the pre-training loss of global micro-step ``n`` (epoch · micro-steps per epoch
  + iteration) becomes NaN; the stage losses stay finite, as for a real blow-up of the weighted sum.
* ``VITFREEZE_TEST_DUMP_RANK_WEIGHTS=<dir>``: after every epoch's checkpoint call, every rank (only rank 0 writes
  checkpoints) writes sha256 digests of the model and optimizer state it passed, of the MIM masks it drew during
  that epoch's training, of the image batches it trained on (its data shard, in order) and of its RNG state, and its FreezeOut frozen set and adaptive decisions,
  ``rank{R}-epoch{E}.json``.

* ``VITFREEZE_TEST_NAN_WEIGHTS_AT_EPOCH=<e>``: the last tensor of the model state handed to epoch ``e``'s
  checkpoint call becomes NaN (a divergence the loss did not show), for the check that refuses to save it.

(``VITFREEZE_TEST_PAUSE_IN_SAVE`` is still read by ``util/checkpoint.save_atomic`` itself.)
"""
import importlib.abc
import importlib.util
import os
import sys

_NAN_AT = os.environ.get('VITFREEZE_TEST_NAN_AT_STEP')
_DUMP_DIR = os.environ.get('VITFREEZE_TEST_DUMP_RANK_WEIGHTS')
_NAN_WEIGHTS_AT = os.environ.get('VITFREEZE_TEST_NAN_WEIGHTS_AT_EPOCH')


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``patch(module)`` right after ``name`` has been executed, before the importer sees it."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders, then wrap its loader
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._real = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module):
        self._real.exec_module(module)
        sys.meta_path.remove(self)
        self.patch(module)


def _patch_nan(engine) -> None:
    """Count training micro-steps inside ``train_one_epoch`` and poison the loss of step ``_NAN_AT``."""
    target = int(_NAN_AT)
    original = engine.train_one_epoch

    def train_one_epoch(state, loader, epoch, args, *a, **kw):
        n_micro = state.steps_per_epoch * args.accum_iter
        counter = {'i': epoch * n_micro}
        model = state.model_without_ddp
        cls = type(model)
        forward = cls.forward

        def poisoned(self, *fa, **fkw):
            out = forward(self, *fa, **fkw)
            if self is model and self.training:
                if counter['i'] == target:
                    out = dict(out, loss=out['loss'] * float('nan'))
                counter['i'] += 1
            return out
        cls.forward = poisoned
        try:
            return original(state, loader, epoch, args, *a, **kw)
        finally:
            cls.forward = forward
    engine.train_one_epoch = train_one_epoch


_MASKS = {'on': False, 'hash': None, 'data': None}  # masks / input batches seen inside train_one_epoch (dump hook)


def _patch_masks(models_mim) -> None:
    """Feed every mask ``LocalMIM.random_masking`` returns while a training epoch runs into ``_MASKS['hash']``, and
    every image batch ``LocalMIM.forward`` gets into ``_MASKS['data']``."""
    import hashlib
    original = models_mim.LocalMIM.random_masking
    forward = models_mim.LocalMIM.forward

    def forward_hashed(self, imgs, *a, **kw):
        if _MASKS['on'] and self.training:
            if _MASKS['data'] is None:
                _MASKS['data'] = hashlib.sha256()
            _MASKS['data'].update(imgs.detach().float().cpu().contiguous().numpy().tobytes())
        return forward(self, imgs, *a, **kw)
    models_mim.LocalMIM.forward = forward_hashed

    def random_masking(self, *a, **kw):
        out = original(self, *a, **kw)
        if _MASKS['on']:
            if _MASKS['hash'] is None:
                _MASKS['hash'] = hashlib.sha256()
            _MASKS['hash'].update(out[1].detach().cpu().contiguous().numpy().tobytes())
        return out
    models_mim.LocalMIM.random_masking = random_masking


def _patch_epoch_masks(engine) -> None:
    original = engine.train_one_epoch

    def train_one_epoch(*a, **kw):
        _MASKS['on'], _MASKS['hash'], _MASKS['data'] = True, None, None
        try:
            return original(*a, **kw)
        finally:
            _MASKS['on'] = False
    engine.train_one_epoch = train_one_epoch


def _patch_engine(engine) -> None:  # one import hook per module: apply every requested patch
    if _NAN_AT:
        _patch_nan(engine)
    if _DUMP_DIR:
        _patch_epoch_masks(engine)


def _patch_dump(checkpoint) -> None:
    import hashlib
    import json

    import torch

    from util import distributed as du
    original = checkpoint.save_checkpoint

    def digest(tensors) -> str:
        h = hashlib.sha256()
        for k, t in tensors:
            h.update(k.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def jsonable(v):
        if torch.is_tensor(v):
            return digest([('', v)])
        if isinstance(v, dict):
            return {str(k): jsonable(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [jsonable(x) for x in v]
        return v

    def save_checkpoint(output_dir, epoch, state, args, numbered):
        paths = original(output_dir, epoch, state, args, numbered)
        opt = [(f'{i}.{k}', v) for i, st in sorted(state['optimizer']['state'].items())
               for k, v in sorted(st.items()) if torch.is_tensor(v)]
        os.makedirs(_DUMP_DIR, exist_ok=True)
        rng = checkpoint.capture_rng_state()
        with open(os.path.join(_DUMP_DIR, f'rank{du.get_rank()}-epoch{epoch}.json'), 'w') as f:
            json.dump({'rank': du.get_rank(), 'epoch': epoch, 'model': digest(sorted(state['model'].items())),
                       'optimizer': digest(opt), 'world_size': du.get_world_size(),
                       'masks': _MASKS['hash'].hexdigest() if _MASKS['hash'] is not None else None,
                       'data': _MASKS['data'].hexdigest() if _MASKS['data'] is not None else None,
                       'rng': digest([('torch', rng['torch']), ('numpy', rng['numpy']['keys']),
                                      ('numpy_pos', torch.tensor([rng['numpy']['pos']])),
                                      ('python', torch.tensor(rng['python']['state'], dtype=torch.int64))]),
                       # the frozen set and the policy's state (decisions, signals; tensors as digests), to
                       # compare the ranks' FreezeOut
                       'freezeout': jsonable({k: v for k, v in (state.get('freezeout') or {}).items()
                                              if k in ('num_frozen', 'frozen_units', 'policy_state')})}, f)

        return paths
    checkpoint.save_checkpoint = save_checkpoint


def _patch_nan_weights(checkpoint) -> None:
    import torch
    original, at = checkpoint.save_checkpoint, int(_NAN_WEIGHTS_AT)

    def save_checkpoint(output_dir, epoch, state, args, numbered):
        if epoch == at:
            floats = [v for v in state['model'].values() if torch.is_tensor(v) and v.is_floating_point()]
            floats[-1].fill_(float('nan'))
        return original(output_dir, epoch, state, args, numbered)
    checkpoint.save_checkpoint = save_checkpoint


def _patch_checkpoint(checkpoint) -> None:  # one import hook per module: apply every requested patch
    if _DUMP_DIR:
        _patch_dump(checkpoint)
    if _NAN_WEIGHTS_AT:
        _patch_nan_weights(checkpoint)


if _NAN_AT or _DUMP_DIR:
    sys.meta_path.insert(0, _AfterImport('engine_pretrain', _patch_engine))
if _DUMP_DIR:
    sys.meta_path.insert(0, _AfterImport('models_mim', _patch_masks))
if _DUMP_DIR or _NAN_WEIGHTS_AT:
    sys.meta_path.insert(0, _AfterImport('util.checkpoint', _patch_checkpoint))
