"""Plugins named on the command line: ``module:Class`` loading, and flags that a named plugin adds to a parser.

A flag such as ``--freeze_policy`` may name a class outside the project; that class can declare its own flags. Its
owner registers ``register_plugin_flag('--freeze_policy', add)``; before parsing, :func:`extend_parser` finds the
flag's value in argv and calls ``add(parser, value)``, so the plugin's flags parse, are checked and show in
``--help`` like any other. (util imports nothing above it: the owner registers itself.)
"""
import argparse
import importlib
from typing import Callable, Dict, List, Optional

from util.errors import UserError

_HOOKS: Dict[str, Callable[[argparse.ArgumentParser, str], None]] = {}


def register_plugin_flag(flag: str, add: Callable[[argparse.ArgumentParser, str], None]) -> None:
    _HOOKS[flag] = add


def load_class(spec: str, base: type, flag: str) -> type:
    """``module:Class`` -> the class, which must subclass ``base``; one-line UserError naming ``flag`` otherwise."""
    mod_name, _, cls_name = spec.partition(':')
    if not mod_name or not cls_name:
        raise UserError(f'{flag} {spec!r}: expected module:Class')
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - an ImportError or the plugin's own error at import time
        raise UserError(f'{flag} {spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e}); put its '
                        f'folder on PYTHONPATH') from None
    cls = getattr(mod, cls_name, None)
    if not isinstance(cls, type) or not issubclass(cls, base):
        what = 'not found' if cls is None else f'is not a subclass of {base.__module__}.{base.__name__}'
        raise UserError(f'{flag} {spec!r}: {cls_name} {what} in {getattr(mod, "__file__", mod_name)}')
    return cls


def _value(argv: List[str], flag: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + '='):
            return a.split('=', 1)[1]
    return None


def extend_parser(parser: argparse.ArgumentParser, argv: List[str]) -> None:
    """Add the flags of every plugin that ``argv`` names (for the registered flags this parser has)."""
    known = {s for a in parser._actions for s in a.option_strings}
    before = set(map(id, parser._actions))
    for flag, add in _HOOKS.items():
        value = _value(argv, flag)
        if flag in known and value is not None:
            add(parser, value)
    for a in parser._actions:
        if id(a) not in before:
            a.plugin = True  # its owner declares no domain here: argparse's type check only (util.args)
