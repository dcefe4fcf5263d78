"""The `ldm` command line: show the config, run one stage, or run the whole pipeline."""

from __future__ import annotations

import argparse
import sys

import yaml

from flows.registry import STAGES, run
from ldm.config import ConfigError, PipelineConfig, _set_dotted, load_config, parse_override, to_yaml
from ldm.io.manifest import StageError
from ldm.stage import Workdir


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
    stage.add_argument("--resume", metavar="RUN", default=None, help="train: continue the stopped run RUN")
    _common(stage)

    gen = sub.add_parser("generate", help="images from prompts with an exported pipeline")
    gen.add_argument("prompts", nargs="*", help="prompts (or --prompts-file)")
    gen.add_argument("--model", required=True, help="a run's pipeline/ folder")
    gen.add_argument("--prompts-file", default=None, help="one prompt per line")
    gen.add_argument("--guidance", type=float, default=4.0)
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="sample.png", help="PNG path (several prompts: <out>-<i>.png)")

    run = sub.add_parser("run", help="run every stage in order on one profile")
    run.add_argument("--overwrite", action="store_true", help="replace output made from another config")
    _common(run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ldm` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    try:
        if getattr(args, "resume", None):
            return _resume(args)
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
            run(name, cfg, args.overwrite)
    except StageError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 1
    return 0


def _resume(args: argparse.Namespace) -> int:
    """`ldm stage train --resume RUN`: the run's recorded config (stop_at_step cleared), then the stage."""
    import importlib

    if args.name != "train":
        print("ldm: error: --resume applies to the train stage only", file=sys.stderr)
        return 2
    driver = importlib.import_module("ldm.train.driver")  # by name: flows never imports torch at load
    base = load_config(args.profile, args.overrides, args.workdir)
    try:
        recorded = yaml.safe_load(driver.resume_config(Workdir.of(base).url, args.resume))
        recorded["workdir"] = base.workdir
        recorded["train"]["stop_at_step"] = None
        for item in args.overrides:
            key, value = parse_override(item)
            _set_dotted(recorded, key, value)
        cfg = PipelineConfig.model_validate(recorded)
        run("train", cfg, args.overwrite)
    except ConfigError as e:
        print(f"ldm: config error: {e}", file=sys.stderr)
        return 2
    except StageError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 1
    return 0


def _generate(args: argparse.Namespace) -> int:
    """`ldm generate`: images from prompts (arguments or a file) with an exported pipeline."""
    import importlib

    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        print("ldm: error: give prompts or --prompts-file", file=sys.stderr)
        return 2
    export = importlib.import_module("ldm.train.export")
    try:
        paths = export.generate(args.model, prompts, args.guidance, args.steps, args.seed, args.out)
    except StageError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
