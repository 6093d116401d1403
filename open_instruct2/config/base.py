"""What every flag group module shares: the `documented` decorator (a dataclass whose field docstrings
become the `--help` text), `require` (one-line ConfigError), and the constants several groups read."""

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import ConfigError


def documented(group: str):
    """Class decorator: make a dataclass, copy each field's docstring into its argparse help, and
    refuse a field without one (the help text can then never be missing)."""

    def wrap(cls):
        cls = dataclass(cls)
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body
        docs = {}
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
        for f in dataclasses.fields(cls):
            if f.name not in docs:
                raise TypeError(f"{cls.__name__}.{f.name} has no docstring")
            f.metadata = MappingProxyType({**f.metadata, "help": docs[f.name].replace("%", "%%")})  # argparse formats help with %
        cls._argument_group_name = group
        return cls

    return wrap


BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
SECRET_FIELDS = ("reference_api_key",)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


_require = require


def require_positive(group, *names: str) -> None:
    """Each named field of `group` must be > 0."""
    for name in names:
        value = getattr(group, name)
        require(value > 0, f"--{name} must be > 0, got {value}")


def require_url(flag: str, url: str) -> None:
    require(url.startswith(("http://", "https://")), f"--{flag} {url!r} must start with http:// or https://")
