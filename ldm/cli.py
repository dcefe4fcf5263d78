"""The `ldm` command line: show the config, run one stage, or run the whole pipeline."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ldm.config import ConfigError, PipelineConfig, load_config, to_yaml


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


# Stages in pipeline order; `ldm run` runs them all. Imports are deferred so `ldm config show`
# stays fast and a stage only loads what it uses.
def _ingest(cfg: PipelineConfig, overwrite: bool) -> dict:
    from data_prep.ingest import run_ingest

    return run_ingest(cfg, overwrite)


def _train_clip(cfg: PipelineConfig, overwrite: bool) -> dict:
    from ldm.clip.stage import run_train_clip

    return run_train_clip(cfg, overwrite)


def _train_aesthetic(cfg: PipelineConfig, overwrite: bool) -> dict:
    from ldm.aesthetic.stage import run_train_aesthetic

    return run_train_aesthetic(cfg, overwrite)


def _filter(cfg: PipelineConfig, overwrite: bool) -> dict:
    from data_prep.filter import run_filter

    return run_filter(cfg, overwrite)


def _train_vae(cfg: PipelineConfig, overwrite: bool) -> dict:
    from ldm.autoencoder.stage import run_train_vae

    return run_train_vae(cfg, overwrite)


def _precompute(cfg: PipelineConfig, overwrite: bool) -> dict:
    from data_prep.precompute import run_precompute

    return run_precompute(cfg, overwrite)


STAGES: dict[str, Callable[[PipelineConfig, bool], dict]] = {
    "ingest": _ingest,
    "train-clip": _train_clip,
    "train-aesthetic": _train_aesthetic,
    "filter": _filter,
    "train-vae": _train_vae,
    "precompute": _precompute,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every `ldm` subcommand."""
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion training pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", help="print the resolved config as YAML")
    _common(show)

    stage = sub.add_parser("stage", help="run one stage")
    stage.add_argument("name", choices=list(STAGES))
    stage.add_argument("--overwrite", action="store_true", help="replace output made from another config")
    _common(stage)

    run = sub.add_parser("run", help="run every stage in order on one profile")
    run.add_argument("--overwrite", action="store_true", help="replace output made from another config")
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
    from data_prep.manifest import StageError

    names = [args.name] if args.command == "stage" else list(STAGES)
    try:
        for name in names:
            STAGES[name](cfg, args.overwrite)
    except StageError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
