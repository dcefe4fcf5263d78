"""The `ldm` command line: show the config, run one stage, or run the whole pipeline."""

from __future__ import annotations

import argparse
import sys

from flows.registry import STAGES, run
from ldm.config import ConfigError, load_config, to_yaml
from ldm.io.manifest import StageError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="local", help="conf/<profile>.yaml (default: local)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B=VALUE",
        help="override one config value; repeatable",
    )
    p.add_argument("--workdir", default=None, help="root URL of all outputs (file:// or s3://)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every `ldm` subcommand."""
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion training pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", help="print the resolved config as YAML")
    _common(show)

    stage = sub.add_parser("stage", help="run one stage")
    stage.add_argument("name", choices=[s.name for s in STAGES])
    stage.add_argument("--overwrite", action="store_true", help="replace output made from another config")
    stage.add_argument("--allow-partial", action="store_true", help="commit even if some input shards were unreadable")
    _common(stage)

    run = sub.add_parser("run", help="run every stage in order on one profile")
    run.add_argument("--overwrite", action="store_true", help="replace output made from another config")
    run.add_argument("--allow-partial", action="store_true", help="commit even if some input shards were unreadable")
    _common(run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ldm` console script."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.profile, args.overrides, args.workdir)
    except ConfigError as e:
        print(f"ldm: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        sys.stdout.write(to_yaml(cfg))
        return 0
    names = [args.name] if args.command == "stage" else [s.name for s in STAGES]
    try:
        for name in names:
            run(name, cfg, args.overwrite, args.allow_partial)
    except StageError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
