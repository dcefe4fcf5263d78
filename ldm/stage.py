"""The stage protocol: what a stage is, where its output lives, and the one way every stage runs.

A stage is a description (name, inputs, the config fields and weight files that define its output)
plus a function that does the work. `run_stage` does the rest, the same for every stage: check the
inputs exist and were made from this config, skip a finished output, refuse one made from another
config, record the intent before the first write, and commit the manifest last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.config import PipelineConfig
from ldm.io import manifest, storage
from ldm.io.manifest import StageError

# Every stage's output folder under the work directory: the one place these paths are written.
LAYOUT = {
    "ingest": "raw",
    "train-clip": "models/clip",
    "train-aesthetic": "models/aesthetic",
    "filter": "filtered",
    "train-vae": "models/vae",
    "precompute": "{latents}",  # latents, or latents-<px>px at a precompute.resolution below ingest's
    "train": "runs/{run}",  # one folder per training run (train.run_id)
    "evaluate": "runs/{run}/eval",  # the sweep of that run (its MLflow runs hang under the training run's)
}


@dataclass(frozen=True)
class Workdir:
    """The folders of one pipeline's work directory URL (`file://` or `s3://`)."""

    url: str
    # (stage, folder): where this run writes that stage's output instead of its usual folder (--overwrite)
    staged: tuple[tuple[str, str], ...] = ()
    run: str = "default"
    latents: str = "latents"  # the latent set's folder: one per resolution

    @classmethod
    def of(cls, cfg: PipelineConfig) -> Workdir:
        """The work directory a config names (its training run id, its latent set)."""
        return cls(storage.normalize(cfg.workdir), run=cfg.train.run_id, latents=latents_folder(cfg))

    def path(self, *parts: str) -> str:
        """A URL under the work directory."""
        return storage.join(self.url, *parts)

    def output(self, stage: str) -> str:
        """The output folder of a stage."""
        return dict(self.staged).get(stage) or self.path(LAYOUT[stage].format(run=self.run, latents=self.latents))

    @property
    def source(self) -> str:
        """Where a synthetic source writes its URL parquet and manifest."""
        return self.path("source")

    @property
    def raw_shards(self) -> str:
        """ingest's webdataset tars."""
        return storage.join(self.output("ingest"), "shards")

    @property
    def filtered_shards(self) -> str:
        """filter's webdataset tars."""
        return storage.join(self.output("filter"), "shards")

    @property
    def latent_parts(self) -> str:
        """precompute's Parquet parts."""
        return storage.join(self.output("precompute"), "parts")

    @property
    def mlartifacts(self) -> str:
        """MLflow artifacts of experiments this pipeline creates."""
        return self.path("mlartifacts")


def latents_folder(cfg: PipelineConfig) -> str:
    """latents for the images at ingest.resolution; latents-<px>px for a precompute.resolution below it, so the
    latent sets of two training phases lie side by side."""
    res = cfg.precompute.resolution
    return "latents" if res in (None, cfg.ingest.resolution) else f"latents-{res}px"


def _none(cfg: PipelineConfig) -> dict[str, str]:
    return {}


def _no_inputs(cfg: PipelineConfig) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    """One stage: its name, what defines its output, and the function that makes it.

    `fields` are dotted config paths whose values define the output; `inputs(cfg)` the stages whose
    output it reads; `weights(cfg)` local files or folders (by config field) whose content defines it.
    `work` names the function (`module:function`) that takes a StageRun, does the work and returns the
    manifest's fields; `summary` the one that turns a manifest into what the user reads. They are named,
    not imported, so describing the pipeline (the stage list, a plan, the Prefect flow) loads no torch.
    """

    name: str
    fields: tuple[str, ...]
    work: str
    summary: str | None = None
    inputs: Callable[[PipelineConfig], tuple[str, ...]] = _no_inputs
    weights: Callable[[PipelineConfig], dict[str, str]] = _none
    # `module:function(cfg)` -> {url: content id} of source files outside the work directory (ingest's URL list)
    sources: str | None = None

    def function(self, which: str = "work") -> Callable[..., Any]:
        """The stage's work (or summary) function, imported on first use."""
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass
class StageRun:
    """One run of a stage: its config, its folders, its inputs' manifests, and the begin step."""

    stage: Stage
    cfg: PipelineConfig
    workdir: Workdir
    out: str
    config_hash: str
    config: dict[str, Any]
    inputs: dict[str, dict]
    resumed: bool
    _begun: bool = field(default=False, repr=False)

    def begin(self) -> None:
        """Record that the output folder now belongs to this config; call before the first write."""
        if not self._begun:
            manifest.begin(self.out, self.stage.name, self.config_hash)
            self._begun = True


def resolve(cfg: PipelineConfig, dotted: str) -> Any:
    """The JSON value of a dotted config path (`ingest.resolution`, or a whole section), knobs left out."""
    node: Any = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return _identity(node)


def _identity(node: Any) -> Any:
    """A section's JSON without its knobs (fields marked `identity: False`): what defines the output."""
    if not hasattr(node, "model_dump"):
        return node
    dumped = node.model_dump(mode="json")
    for name, f in type(node).model_fields.items():
        if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("identity") is False:
            dumped.pop(name, None)
        elif hasattr(getattr(node, name), "model_dump"):
            dumped[name] = _identity(getattr(node, name))
    return dumped


def config_of(stage: Stage, cfg: PipelineConfig) -> dict[str, Any]:
    """The config values that define a stage's output, keyed by dotted path."""
    return {path: resolve(cfg, path) for path in stage.fields}


_content_ids: dict[tuple[str, int, int], str] = {}


def content_id(path: str) -> str:
    """Identity of a local weights file or folder by content: sha256 (size and mtime past 1 GiB).

    Weights replaced at the same path are new weights for every stage that used them.
    """
    p = Path(path.removeprefix("file://")).expanduser()
    if p.is_dir():
        return manifest.digest({f.name: content_id(str(f)) for f in sorted(p.iterdir()) if f.is_file()})
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _content_ids:
        big = st.st_size > 2**30
        _content_ids[key] = f"size{st.st_size}-mtime{st.st_mtime_ns}" if big else storage.file_sha256(p)
    return _content_ids[key]


def weight_ids(stage: Stage, cfg: PipelineConfig) -> dict[str, str]:
    """Content ids of the local weights a stage loads, by config field; a missing path is one line."""
    ids = {}
    for name, path in stage.weights(cfg).items():
        local = Path(path.removeprefix("file://")).expanduser()
        if "://" in path and not path.startswith("file://"):
            raise StageError(f"{stage.name}: {name} = {path} must be a local path (weights are never downloaded)")
        if not local.exists():
            raise StageError(f"{stage.name}: {name} = {path} does not exist")
        ids[name] = content_id(path)
    return ids


def check_made_by(m: dict, cfg: PipelineConfig, folder: str, stage: str) -> None:
    """Refuse an output whose recorded config differs from this config, naming the first field that differs."""
    for path, value in (m.get("config") or {}).items():
        try:
            now = resolve(cfg, path)
        except AttributeError:
            now = None
        diff = _first_difference(path, value, now)
        if diff is not None:
            where, old, new = diff
            raise StageError(
                f"{folder} was made with {where}={_short(old)}, this config has {where}={_short(new)}; "
                f"rerun the {stage} stage (with --overwrite)"
            )


def _first_difference(path: str, old: Any, new: Any) -> tuple[str, Any, Any] | None:
    """The dotted path and both values of the first leaf where two config values differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(f"{path}.{key}", old.get(key), new.get(key))
            if diff is not None:
                return diff
        return None
    return None if old == new else (path, old, new)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def finished_input(wd: Workdir, name: str, cfg: PipelineConfig, _seen: dict[str, dict] | None = None) -> dict:
    """The manifest of a finished stage, checked down its chain: made from this config and from the
    inputs now on disk. StageError naming the stage to run otherwise."""
    seen = {} if _seen is None else _seen
    if name in seen:
        return seen[name]
    folder = wd.output(name)
    url = storage.join(folder, manifest.MANIFEST)
    if not storage.exists(url):
        raise StageError(f"{url} does not exist: run the {name} stage first")
    try:
        m = storage.read_json(url)
    except ValueError as e:
        raise StageError(f"{url} is not valid JSON ({e}); rerun the {name} stage with --overwrite") from e
    check_made_by(m, cfg, folder, name)
    for inp, recorded in (m.get("inputs") or {}).items():
        if finished_input(wd, inp, cfg, seen).get("config_hash") != recorded:
            raise StageError(f"{folder} was made from another {inp} output than the one in {wd.output(inp)}; "
                             f"rerun the {name} stage (with --overwrite)")  # fmt: skip
    seen[name] = m
    return m


# Libraries whose own log records are chatter to the user: Ray's start-up, Ray Data's execution plans, MLflow's
# and alembic's store set-up, HTTP retries. While a stage works they go to W/logs/<stage>.log ("" = the root
# logger, where alembic's fileConfig puts a stderr handler). The stage's own progress bar and summary stay.
LIBRARY_LOGGERS = ("", "ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "sqlalchemy", "urllib3",
                   "img2dataset", "botocore", "s3fs", "fsspec", "filelock")  # fmt: skip
_stage_log: logging.FileHandler | None = None
_saved_loggers: dict[str, tuple[list[logging.Handler], bool]] = {}


def stage_log_file() -> str | None:
    """The local file the running stage's library chatter goes to; None outside a stage."""
    return _stage_log.baseFilename if _stage_log else None


def redirect_library_logs() -> None:
    """Point the library loggers at the running stage's log file; call again after importing a library that
    configures its loggers at import (ray, ray.data, mlflow), since that replaces their handlers."""
    # Ray Data reads this when first imported; a live DataContext is switched directly (looked up, not
    # imported: ldm.stage stays free of Ray). Its execution plans still reach the log through its logger.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    data = sys.modules.get("ray.data")
    if data is not None and os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1":
        data.DataContext.get_current().enable_progress_bars = False
    if _stage_log is None:
        return
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        _saved_loggers.setdefault(name, (logger.handlers[:], logger.propagate))
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
        logger.addHandler(_stage_log)
        logger.propagate = False


class _LazyFileHandler(logging.FileHandler):
    """A log file (and its folder) made on the first record: a stage refused before any work writes nothing."""

    def _open(self):  # noqa: ANN202 - logging's own signature
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


@contextlib.contextmanager
def stage_log(wd: Workdir, name: str) -> Iterator[str]:
    """Library chatter of one stage's work into W/logs/<name>.log (appended); yields that URL.

    An object-store work directory gets a local file, uploaded when the stage ends.
    """
    global _stage_log
    url = wd.path("logs", f"{name}.log")
    remote = not url.startswith("file://")
    local = os.path.join(tempfile.mkdtemp(prefix="ldm-log-"), f"{name}.log") if remote else url[len("file://") :]
    if remote and storage.exists(url):  # append to the earlier runs' log, as a local file would be
        fs, path = storage.fs_for(url)
        Path(local).write_bytes(fs.cat_file(path))
    handler = _LazyFileHandler(local, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    _stage_log = handler
    try:
        redirect_library_logs()
        yield url
    finally:
        _stage_log = None
        for logger_name, (handlers, propagate) in _saved_loggers.items():
            logger = logging.getLogger(logger_name)
            logger.handlers, logger.propagate = handlers, propagate
        _saved_loggers.clear()
        handler.close()
        if remote:  # the log is a convenience: an upload error must not fail the stage or hide its own error
            with contextlib.suppress(Exception):
                storage.write_bytes_atomic(url, Path(local).read_bytes())
            shutil.rmtree(os.path.dirname(local), ignore_errors=True)


def run_stage(stage: Stage, cfg: PipelineConfig, overwrite: bool = False, allow_partial: bool = False) -> dict:
    """Run one stage through the protocol: inputs checked, skip if done, begin, work, commit. Returns the manifest.

    A work function that could not read some input returns `skipped` (one line per shard); the stage
    then fails without committing, so a rerun retries those shards, unless `allow_partial`.
    """
    wd = Workdir.of(cfg)
    out = wd.output(stage.name)
    manifest.swap(out)  # an --overwrite run killed after its commit but before its swap: finish the swap
    seen: dict[str, dict] = {}
    inputs = {name: finished_input(wd, name, cfg, seen) for name in stage.inputs(cfg)}
    config = config_of(stage, cfg)
    weights = weight_ids(stage, cfg)
    input_hashes = {name: m["config_hash"] for name, m in inputs.items()}
    identity = {"config": config, "weights": weights, "inputs": input_hashes}
    if stage.sources:  # a new or changed source file is another output, refused or redone, never "up to date"
        identity["sources"] = stage.function("sources")(cfg)
    chash = manifest.digest(identity)
    state = manifest.check_output(out, chash, overwrite)
    if state is manifest.OutputState.DONE:
        print(f"{stage.name}: {out} is up to date; skipping")
        return storage.read_json(storage.join(out, manifest.MANIFEST))
    target = out
    if state is manifest.OutputState.REPLACE:  # the old output stays usable until the new one commits
        target = manifest.staging(out)
        state = manifest.check_output(target, chash, overwrite=True)
        if state is manifest.OutputState.REPLACE:  # a staged run of yet another config: never committed
            storage.remove(target)
        wd = dataclasses.replace(wd, staged=((stage.name, target),))
    run = StageRun(stage, cfg, wd, target, chash, config, inputs, resumed=state is manifest.OutputState.RESUME)
    with stage_log(wd, stage.name) as log_url:
        fields = stage.function("work")(run)
    run.begin()
    skipped = fields.get("skipped") or []
    if skipped and not allow_partial:
        raise StageError(
            f"{stage.name}: {len(skipped)} input shard(s) could not be read ({skipped[0]}); nothing was committed: "
            "repair or remove them and rerun (finished work is kept), or pass --allow-partial to accept the loss"
        )
    if target != out:  # paths the work recorded name the folder the output is about to be moved to
        fields = json.loads(json.dumps(fields, default=str).replace(json.dumps(target)[1:-1], json.dumps(out)[1:-1]))
    result = manifest.commit(
        target, stage.name, chash, config, inputs=input_hashes, weight_ids=weights, partial=bool(skipped), **fields
    )
    manifest.swap(out)
    if stage.summary is not None:
        print(stage.function("summary")(result) + f"\n  library logs: {log_url}")
    return result
