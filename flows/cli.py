"""The `ldm` command line: show the config, run one stage, or run the whole pipeline."""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import yaml

from flows.plan import plan
from flows.registry import STAGES, run
from ldm import budget
from ldm.config import ConfigError, PipelineConfig, load_config, parse_override, set_dotted, to_yaml
from ldm.io.manifest import StageError, root_cause
from ldm.io.storage import StorageError
from ldm.stage import Workdir

STARTED = time.time()  # `ldm run`'s clock: a time budget counts from here


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
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback too")


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

    plan_cmd = sub.add_parser("plan", help="print the stages, their inputs, outputs, resources and GPU-hours")
    _common(plan_cmd)

    run = sub.add_parser("run", help="run every stage in order on one profile (the train-ldm flow, in-process)")
    run.add_argument("--overwrite", action="store_true", help="replace output made from another config")
    run.add_argument("--allow-partial", action="store_true", help="commit even if some input shards were unreadable")
    run.add_argument("--stages", nargs="+", default=None, metavar="NAME", help="run only these stages (in order)")
    _common(run)

    stack = sub.add_parser("stack", help="the local stack: Prefect, a worker, MLflow, Ray and S3 on 127.0.0.1")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument("--dir", default=".stack", help="where pids, logs and state live (default: .stack)")
    stack.add_argument("--ports", default=None, metavar="NAME=PORT,...", help="e.g. prefect=4200,mlflow=5000")
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def describe(e: BaseException) -> str:
    """One line for the user: what went wrong (the file, bucket or address) and what to do."""
    cause = root_cause(e, stop=(StageError, StorageError))
    kind = type(cause).__name__
    if isinstance(cause, StageError | StorageError):
        return _one_line(cause)
    if isinstance(cause, FileNotFoundError):
        return f"{cause.filename or _one_line(cause)} does not exist; check the path in the config or --set it"
    if isinstance(cause, PermissionError):
        return f"permission denied on {cause.filename or _one_line(cause)}; check its permissions or credentials"
    if type(cause).__module__.split(".")[0] in ("botocore", "s3fs", "aiobotocore"):
        return f"S3 request failed ({kind}: {_one_line(cause)}); check the bucket, credentials and AWS_ENDPOINT_URL"
    if isinstance(cause, ConnectionError) or kind == "ConnectionError":  # Ray raises the builtin one
        return f"cannot connect ({_one_line(cause)}); check RAY_ADDRESS / compute.ray_address"
    return f"{kind}: {_one_line(cause)} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ldm` console script; every failure ends as one line on stderr (2 config, 1 stage)."""
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "stack":
        from flows import stack

        return stack.main(args.action, args.dir, args.ports)
    try:
        if getattr(args, "resume", None):
            return _resume(args)
        cfg = load_config(args.profile, args.overrides, args.workdir)
    except ConfigError as e:
        if args.debug:
            traceback.print_exc()
        print(f"ldm: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        sys.stdout.write(to_yaml(cfg))
        return 0
    if args.command == "plan":
        sys.stdout.write(plan(cfg, args.profile))
        return 0
    if args.command == "run":
        return _run_flow(args, cfg)
    names = [args.name]
    name = names[0]
    try:
        for name in names:
            run(name, cfg, args.overwrite, args.allow_partial)
    except Exception as e:  # noqa: BLE001 - the one error path: every stage failure becomes one line
        if args.debug:
            traceback.print_exc()
        msg = describe(e).removeprefix(f"{name}: ")  # many StageErrors already name their stage
        print(f"ldm: {name}: {msg}", file=sys.stderr)
        return 1
    return 0


def _run_flow(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    """`ldm run`: the train-ldm flow in this process, on Prefect's ephemeral API unless PREFECT_API_URL names one."""
    import os
    import sysconfig

    shadow = os.path.join(sysconfig.get_paths()["purelib"], "dataclasses.py")
    if os.path.exists(shadow):  # img2dataset pulls in the Python 3.6 backport; see the Makefile
        print(f"ldm: run: {shadow} (the `dataclasses` backport) shadows the standard library in Prefect's API "
              "server, which then cannot start; remove it: pip uninstall dataclasses", file=sys.stderr)  # fmt: skip
        return 1
    workdir = Workdir.of(cfg).url
    if workdir.startswith("file://") and "PREFECT_HOME" not in os.environ:
        # The ephemeral API's SQLite database and logs live with the run's other outputs, not in ~/.prefect.
        # Made here: Prefect creates only the last folder, so on a fresh machine (no work/ yet) its
        # ephemeral API could not open its database and `make demo` died before the first stage.
        home = os.path.join(workdir.removeprefix("file://"), ".prefect")
        os.makedirs(home, exist_ok=True)
        os.environ["PREFECT_HOME"] = home
    from flows.endpoints import env_overrides
    from flows.flow import train_ldm  # imported late: PREFECT_HOME must be set before Prefect reads its settings
    from flows.report import closing_lines
    from ldm.tracking import tracking_uri

    if not args.debug:
        _quiet_prefect_tracebacks()
    try:
        overrides = args.overrides + budget.clock(cfg, STARTED)  # the budget counts from this command's first line
        results = train_ldm(args.profile, overrides, args.workdir, args.stages, args.overwrite, args.allow_partial)
    except ConfigError as e:
        print(f"ldm: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - every stage failure becomes one line
        if args.debug:
            traceback.print_exc()
        print(f"ldm: {describe(e)}", file=sys.stderr)
        return 1
    cfg = load_config(args.profile, env_overrides(cfg) + args.overrides, args.workdir)  # as the flow saw it
    print(closing_lines(cfg, tracking_uri(cfg), results))
    return 0


def _quiet_prefect_tracebacks() -> None:
    """Prefect's console lines keep their messages but lose their tracebacks (--debug keeps them): a failed
    stage ends in the CLI's one line. Only the terminal's copy: Prefect's API logs (its UI) keep them whole."""
    import logging

    def strip(format_):
        def format_without_traceback(record: logging.LogRecord) -> str:
            saved = record.exc_info, record.exc_text, record.stack_info
            record.exc_info = record.exc_text = record.stack_info = None
            try:
                return format_(record)
            finally:
                record.exc_info, record.exc_text, record.stack_info = saved

        return format_without_traceback

    loggers = [logging.getLogger()]  # Prefect puts its console handler on the root logger
    loggers += [logging.getLogger(n) for n in logging.root.manager.loggerDict if n.startswith("prefect")]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler).__name__ == "PrefectConsoleHandler" and not getattr(handler, "_ldm_quiet", False):
                handler.format, handler._ldm_quiet = strip(handler.format), True


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
        if recorded.get("budget"):  # the run's count is in its checkpoint; a stale clock would mean nothing
            recorded["budget"]["deadline"] = None
        for item in args.overrides:
            key, value = parse_override(item)
            set_dotted(recorded, key, value)
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
        try:
            with open(args.prompts_file) as f:
                prompts += [line.strip() for line in f if line.strip()]
        except OSError as e:
            print(f"ldm: error: --prompts-file {args.prompts_file}: {e.strerror}", file=sys.stderr)
            return 2
    if not prompts:
        print("ldm: error: give prompts or --prompts-file", file=sys.stderr)
        return 2
    export = importlib.import_module("ldm.train.export")
    try:
        paths = export.generate(args.model, prompts, args.guidance, args.steps, args.seed, args.out)
    except (StageError, OSError) as e:  # OSError: --out where no folder can be made
        print(f"ldm: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
