"""Entry point: `python -m open_instruct2.train_grpo [cfg.yaml] [--flag value ...]`.

Parse (HfArgumentParser; a YAML file first, flags after it override) -> smoke-test overrides -> validate ->
`--dry_run` prints the resolved configuration, or the trainer runs. Any UserError becomes one line on
stderr and exit code 2; nothing on disk has been touched by then.
"""

import argparse
import json
import textwrap
import logging
import os
import sys

import yaml
from transformers import HfArgumentParser

from .config import GROUPS, SECRET_FIELDS, Config, apply_smoke_test, validate
from .errors import ConfigError, UserError
from .signals import Stopped, StopRequest

EXIT_USER_ERROR = 2
API_KEY_ENV = "OPEN_INSTRUCT2_REFERENCE_API_KEY"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines wrapped at spaces only, so names like mini-batch or open-instruct stay whole."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(HfArgumentParser):
    """HfArgumentParser whose errors are exceptions (one line), not usage dumps and sys.exit."""

    def error(self, message):
        raise ConfigError(f"{message}; run with --help to list the flags")


def build_parser() -> Parser:
    return Parser(
        list(GROUPS.values()),
        prog="python -m open_instruct2.train_grpo",
        usage="%(prog)s [cfg.yaml] [--flag value ...]",
        description="Single-process GRPO trainer. A YAML file may come first; flags after it override it.",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )


def yaml_to_argv(path: str, parser: Parser) -> list[str]:
    """Turn a YAML mapping of flag: value into argv tokens, so YAML values get the same parsing and
    checks as flags."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config file {path!r}: cannot read it ({e.strerror}); check the path") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must be a mapping of flag: value, found {type(data).__name__}")
    known = {a.dest for a in parser._actions}
    argv = []
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"config file {path!r}: unknown flag {key!r}; run with --help to list the flags")
        if value is None:
            continue  # null means "keep the default"
        values = value if isinstance(value, list) else [value]
        argv.append(f"--{key}")
        argv.extend(("true" if v else "false") if isinstance(v, bool) else str(v) for v in values)
    return argv


def parse_config(argv: list[str]) -> Config:
    parser = build_parser()
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        argv = yaml_to_argv(argv[0], parser) + argv[1:]
    *groups, remaining = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False, return_remaining_strings=True)
    if remaining:
        raise ConfigError(f"unrecognized arguments: {' '.join(remaining)}; run with --help to list the flags")
    cfg = Config(*groups)
    if cfg.reference.reference_api_key is None and os.environ.get(API_KEY_ENV):
        cfg.reference.reference_api_key = os.environ[API_KEY_ENV]
    return cfg


def redact(text: str, cfg: Config) -> str:
    for name in SECRET_FIELDS:
        secret = getattr(cfg.reference, name, None)
        if secret:
            text = text.replace(secret, "***")
    return text


def quiet_libraries() -> None:
    """Library progress bars and warnings would put lines on stderr, which is kept for our errors."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    except (ImportError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop = StopRequest().install()  # SIGINT / SIGTERM: finish the step, save, stop the servers (signals.py)
    cfg = None
    try:
        cfg = apply_smoke_test(parse_config(argv))
        logging.basicConfig(
            level=getattr(logging, cfg.experiment.log_level), format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
        )
        quiet_libraries()
        validate(cfg)
        if cfg.experiment.dry_run:
            from .runtime import resolved_summary

            print(json.dumps(resolved_summary(cfg), indent=2, default=str))
            return 0
        from .trainer import train

        train(cfg, stop)
        return 0
    except UserError as e:
        message = " ".join(str(e).split())
        print(f"error: {redact(message, cfg) if cfg else message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Stopped as e:
        print(e.message, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a signal handler other than ours (e.g. under a debugger)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
