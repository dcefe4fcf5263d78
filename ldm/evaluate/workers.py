"""The sweep's Ray actors: a small pool, one per GPU (or CPU), each loading the models once and sampling the
batches of grid points it is handed; the driver only hands out work and gathers each batch's small result.

Actors rather than a task per batch: a worker process spends seconds importing torch and diffusers and
loading the pipeline, which a task would pay for every batch. Batches rather than whole points: the local
profile sweeps 5 points on 2 CPUs and prod 56 on 32 GPUs, so whole points would leave actors idle at the
end; a batch is seconds of work on either (SD-2-base: 64 images x 25-50 steps per GPU), its result a few
hundred bytes of scores plus its features (64 x 2048 float32 for Inception: 0.5 MiB).
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldm.config import PipelineConfig
from ldm.io.manifest import StageError, root_cause

# A unit of work: ("reference",) the real images' FD statistics, ("ceilings", judge_url) the judge on real
# renders and their reconstructions, ("batch", i, point, b, judge_url, precision) batch b of grid point i.
Unit = tuple


class SweepWorker:
    """One sweep actor: the exported pipeline's parts, the scorer CLIP and the FD extractor, loaded once."""

    def __init__(self, cfg_dict: dict[str, Any], train_manifest: dict, prompts):
        import torch

        from ldm.clip.encoder import load_encoder
        from ldm.evaluate.sweep import checkpoint_dir, load_parts, pipeline_dir
        from ldm.metrics.features import make_extractor

        cfg = PipelineConfig.model_validate(cfg_dict)
        if not cfg.compute.use_gpu:
            torch.set_num_threads(1)  # one core per actor: the pool has as many actors as the cluster has CPUs
        self.device = "cuda" if cfg.compute.use_gpu and torch.cuda.is_available() else "cpu"
        # Its own copies of a checkpoint and pipeline on an object store: the driver's are on another node.
        self._tmp = tempfile.TemporaryDirectory(prefix="ldm-evaluate-")
        ckpt, root = Path(self._tmp.name) / "checkpoint", Path(self._tmp.name) / "pipeline"
        checkpoint = checkpoint_dir(train_manifest, str(ckpt))
        pipeline = pipeline_dir(train_manifest["pipeline"], str(root))
        scorer = load_encoder(cfg)
        scorer.model.to(self.device)
        extractor = make_extractor(cfg, scorer, self.device)
        self.parts = load_parts(cfg, pipeline, checkpoint, scorer, extractor, self.device)
        self.cfg, self.prompts, self.judge_url = cfg, prompts, None

    def describe(self) -> dict:
        """Where this actor runs and whether it samples in bf16 under the configured mixed_precision."""
        import ray

        from ldm.devices import autocast_dtype

        bf16 = autocast_dtype(self.cfg.evaluate.mixed_precision, self.device) is not None
        return {"node": ray.get_runtime_context().get_node_id(), "device": self.device, "bf16": bf16}

    def cleanup(self) -> None:
        """Delete this actor's copies of the checkpoint and pipeline (an SD-2 checkpoint is gigabytes)."""
        self._tmp.cleanup()

    def _judge(self, url: str | None) -> None:
        """Load the judge the driver trained (cached under W/cache/judge/) the first time a unit names it."""
        from ldm.io import storage
        from ldm.metrics import judge as J

        if url is not None and url != self.judge_url:
            fs, path = storage.fs_for(url)
            with fs.open(path, "rb") as f:
                self.parts.judge, self.judge_url = J.from_bytes(f.read()), url

    def run(self, unit: Unit):
        """Do one unit of work; its result is small (statistics, scores, a few images)."""
        from ldm.evaluate import sweep
        from ldm.evaluate.data import real_batches, reference, reference_stats

        cfg, ev = self.cfg, self.cfg.evaluate
        if unit[0] == "reference":
            return reference_stats(cfg, reference(cfg, self.prompts), self.parts.extractor)
        if unit[0] == "ceilings":
            self._judge(unit[1])
            specs = self.prompts.specs
            return sweep.ceilings(self.parts, real_batches(cfg, specs, ev.batch_size), sweep.judge_targets(specs))
        _, _, point, b, judge_url, precision = unit
        self._judge(judge_url)
        return sweep.sample_batch(self.parts, self.prompts.prompts, point, b, cfg.seed, ev.batch_size, precision)


class Pool:
    """The sweep's actors: started at once (they load while the driver does its own setup), stopped by close()."""

    def __init__(self, cfg: PipelineConfig, train_manifest: dict, prompts, resources: dict, most: int):
        import ray

        gpu = cfg.compute.use_gpu
        kind = "GPU" if gpu else "CPU"
        n = min(most, cfg.evaluate.actors or max(1, int(resources.get(kind, 1))))
        res = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        # A restarted actor (its node lost) reloads its parts and Ray retries the unit it held: a unit's
        # result depends only on the unit, so a retry gives the same numbers.
        remote = ray.remote(SweepWorker).options(**res, max_restarts=2, max_task_retries=2)
        # Held here for the actors' lifetime: a restart re-reads its constructor's arguments from the object store.
        self._prompts = ray.put(prompts)
        self.actors = [remote.remote(cfg.model_dump(mode="json"), train_manifest, self._prompts) for _ in range(n)]
        self.units = [0] * n
        self.info: list[dict] = []

    def ready(self) -> list[dict]:
        """Wait for every actor to load; where each runs. A load failure is raised as the stage's error."""
        import ray

        self.info = _get(lambda: ray.get([a.describe.remote() for a in self.actors]))
        return self.info

    def run(self, units: list[Unit], on_result: Callable[[Unit, Any], None]) -> None:
        """Hand the units out in order, each to the next idle actor; on_result(unit, result) as each finishes."""
        import ray

        idle, pending, queue = deque(range(len(self.actors))), {}, deque(units)
        while queue or pending:
            while queue and idle:
                i, unit = idle.popleft(), queue.popleft()
                pending[self.actors[i].run.remote(unit)] = (i, unit)
            [done], _ = ray.wait(list(pending), num_returns=1)
            i, unit = pending.pop(done)
            idle.append(i)
            self.units[i] += 1
            on_result(unit, _get(lambda ref=done: ray.get(ref)))

    def summary(self) -> dict:
        """Where the actors ran and how many units each did (for the manifest)."""
        return {"actors": [{**info, "units": n} for info, n in zip(self.info, self.units, strict=False)]}

    def close(self) -> None:
        """Stop the actors (their CPUs or GPUs go back to the cluster), their local copies deleted first."""
        import ray

        try:  # best effort: an actor that failed to start has nothing to delete
            ray.wait([a.cleanup.remote() for a in self.actors], num_returns=len(self.actors), timeout=60)
        finally:
            for a in self.actors:
                ray.kill(a)


def _get(fetch: Callable[[], Any]) -> Any:
    """fetch(), with an actor's StageError (e.g. a checkpoint gone from its node) raised as the stage's own."""
    try:
        return fetch()
    except Exception as e:  # Ray wraps what an actor raised (RayTaskError, ActorDiedError): name the cause
        cause = root_cause(e)
        if isinstance(cause, StageError):
            raise StageError(" ".join(str(cause).split())) from None
        # An actor whose __init__ raised dies with ActorDiedError, which keeps the cause only as text.
        found = [ln for ln in str(e).splitlines() if ln.startswith(f"{StageError.__module__}.StageError: ")]
        if found:
            raise StageError(found[-1].split("StageError: ", 1)[1].strip()) from None
        raise
