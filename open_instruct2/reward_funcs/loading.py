"""Finding reward functions by name: a builtin name, a dotted import path (`my_pkg.rewards.fn`, `trl.rewards.
think_format_reward`) or a file and a name (`path/to/rewards.py:fn`), and reading which keyword arguments each takes."""

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError


@dataclass
class RewardFunction:
    """One entry of --reward_funcs."""

    name: str
    """Its name in metrics (reward/<name>/mean): the builtin's name or the function's attribute name."""
    fn: Callable
    weight: float
    accepts: frozenset[str] | None
    """The keyword arguments it takes; None when it takes **kwargs (then it gets every one)."""
    required: frozenset[str]
    """The keyword arguments it cannot do without (no default)."""
    is_async: bool


def _load_file(path: str, attr: str, spec: str) -> object:
    if not os.path.isfile(path):
        raise UserError(f"--reward_funcs {spec!r}: file {path!r} not found; check the path")
    module_name = f"open_instruct2_reward_file_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # the file may import its neighbours
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in the user's file is theirs to fix: one line
        sys.modules.pop(module_name, None)
        raise UserError(f"--reward_funcs {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(folder)
    if not hasattr(module, attr):
        found = ", ".join(n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module_name)
        raise UserError(f"--reward_funcs {spec!r}: {path} has no {attr!r}; its functions: {found or 'none'}")
    return getattr(module, attr)


def _load_dotted(spec: str) -> object:
    module_name, _, attr = spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - not installed, or it failed to import: one line
        raise UserError(f"--reward_funcs {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); install it, "
                        "or name a file as path/to/rewards.py:function") from None
    if not hasattr(module, attr):
        raise UserError(f"--reward_funcs {spec!r}: module {module_name!r} has no {attr!r}")
    return getattr(module, attr)


def resolve(spec: str, builtins: dict[str, Callable]) -> tuple[str, Callable]:
    """(name, callable) for one --reward_funcs entry."""
    if spec in builtins:
        return spec, builtins[spec]
    if ":" in spec:
        path, _, attr = spec.rpartition(":")
        fn, name = _load_file(path, attr, spec), attr
    elif "." in spec:
        fn, name = _load_dotted(spec), spec.rpartition(".")[2]
    else:
        raise UserError(f"--reward_funcs {spec!r} is not a builtin ({', '.join(builtins)}); name a function as "
                        "my_pkg.module.function or path/to/rewards.py:function")
    if not callable(fn):
        raise UserError(f"--reward_funcs {spec!r} is a {type(fn).__name__}, not a function")
    return name, fn


def signature_of(name: str, fn: Callable) -> tuple[frozenset[str] | None, frozenset[str], bool]:
    """(accepted keyword names or None for **kwargs, required names, is async)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, frozenset(), False
    params = sig.parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params) and not any(p.kind == p.VAR_KEYWORD for p in params):
        raise UserError(f"reward function {name!r} takes *args only; it is called with keyword arguments "
                        "(prompts=..., completions=..., <dataset columns>=...): give it named parameters or **kwargs")
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = frozenset(p.name for p in named if p.default is p.empty)
    accepts = None if any(p.kind == p.VAR_KEYWORD for p in params) else frozenset(p.name for p in named)
    call = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
    return accepts, required, inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def load(specs: list[str], weights: list[float] | None, builtins: dict[str, Callable]) -> list[RewardFunction]:
    if weights is not None and len(weights) != len(specs):
        raise UserError(f"--reward_weights has {len(weights)} values for {len(specs)} --reward_funcs; give one weight per function")
    out = []
    for i, spec in enumerate(specs):
        name, fn = resolve(spec, builtins)
        if name in {f.name for f in out}:
            raise UserError(f"--reward_funcs names {name!r} twice; each function's metrics are logged under its name")
        accepts, required, is_async = signature_of(name, fn)
        out.append(RewardFunction(name, fn, 1.0 if weights is None else float(weights[i]), accepts, required, is_async))
    return out
