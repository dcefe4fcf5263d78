"""The evaluate stage on tiny trained runs: child runs in MLflow, the registered pyfunc model, skip on rerun,
refusals before sampling, and a plain diffusers loop reproducing our sampler.

The runs train on test_train's directly written latents (random VAE and CLIP in their real layouts):
the sweep's plumbing is under test here, not the quality of a model trained for two steps.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ldm.config import ConfigError
from ldm.io.manifest import StageError
from tests.helpers import make_config
from tests.ldm.test_train import TRAIN, cluster, write_inputs  # noqa: F401 - cluster is a fixture

RUN = [*TRAIN, "train.steps=2", "compute.num_workers=1", "train.batch_size=4", "train.audit=false"]
MODEL = "ldm-test"


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):  # noqa: F811 - the imported fixture
    """A work directory with two tiny training runs, `a` and `b` (different seeds), and their configs."""
    from flows.registry import run

    workdir = tmp_path_factory.mktemp("evaluate")
    write_inputs(workdir)
    cfgs = {}
    for name, seed in (("a", 0), ("b", 1)):
        cfgs[name] = make_config(workdir, *RUN, f"train.run_id={name}", f"seed={seed}",
                                 f"evaluate.registered_model={MODEL}")  # fmt: skip
        run("train", cfgs[name])
    return workdir, cfgs


def _children(client, parent: str):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_sweeps_of_two_runs_compare_and_register_a_loadable_model(trained):
    """Two runs' sweeps log child runs with the same param and metric names; the best point is registered
    under alias `candidate` and pyfunc loads it and returns an image; a rerun on a wider grid reuses every
    logged point and samples only the new one.

    Bugs caught: child runs not attached to the training run (no mlflow.parentRunId); param or metric names
    that differ between runs (the MLflow UI cannot compare them); a pyfunc model that does not load outside
    the stage (artefact layout, pickled state); a rerun that resamples and logs duplicate points; a rerun
    with another judge that reuses the old judge's accuracies.
    """
    import mlflow
    from mlflow import MlflowClient

    from flows.registry import run

    workdir, cfgs = trained
    # A process whose global MLflow store is elsewhere (as when `ldm run` skipped every earlier stage): the
    # model must still be logged to the configured store, or registering it finds no run.
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/elsewhere.db")
    manifests = {name: run("evaluate", cfg) for name, cfg in cfgs.items()}
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    client = MlflowClient()
    names = {}
    for name, m in manifests.items():
        children = _children(client, m["mlflow_parent_run_id"])
        assert len(children) == 3  # guidance 1 and 3, plus the untrained baseline
        names[name] = (
            {frozenset(c.data.params) for c in children},
            {frozenset(c.data.metrics) for c in children},
        )
        assert len(names[name][0]) == len(names[name][1]) == 1
        assert {"fd", "clip_score", "judge_colour", "judge_shape", "judge_position"} <= set(children[0].data.metrics)
        assert {"guidance", "steps", "sampler", "n_samples", "resolution", "extractor", "weights_hash"} <= set(
            children[0].data.params
        )
        assert all(client.list_artifacts(c.info.run_id) for c in children)  # each point's sample grid
        parent_files = {a.path for a in client.list_artifacts(m["mlflow_parent_run_id"], "eval")}
        assert parent_files == {"eval/grid.csv", "eval/pareto.png"}
        assert np.isfinite(m["untrained_fd"]) and (workdir / "runs" / name / "eval" / "pareto.png").is_file()
    assert names["a"] == names["b"]
    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert str(version.version) == manifests["b"]["registered_model"]["version"]
    assert version.tags["point.guidance"] == str(manifests["b"]["best"]["guidance"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
    images = model.predict(["a red circle on a white background"])
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8

    # A grid grown by one guidance value: only the new point samples; the logged ones are reused as they are.
    wider = cfgs["a"].model_copy(deep=True)
    wider.evaluate.guidance = [1, 3, 2]
    again = run("evaluate", wider, overwrite=True)
    assert again["points"] == {"logged": 1, "skipped": 3}
    assert len(_children(client, again["mlflow_parent_run_id"])) == 4
    old = {r["mlflow_run_id"]: r for r in manifests["a"]["grid"]}
    assert all(old[r["mlflow_run_id"]] == r for r in again["grid"] if r["guidance"] != 2)

    # Another judge reads the same images differently: its points are new ones, not the old judge's scores.
    rejudged = wider.model_copy(deep=True)
    rejudged.evaluate.judge_epochs += 1
    third = run("evaluate", rejudged, overwrite=True)
    assert third["points"] == {"logged": 4, "skipped": 0}


def test_plain_diffusers_loop_gives_our_latents(trained):
    """A diffusers loop over the exported parts (UNet, DDIM from scheduler/, same seed) matches `sample`.

    Bugs caught: guidance combined in the wrong order (u + s(c - u) vs c + s(u - c)), a sampler that
    skips scale_model_input or init_noise_sigma, timesteps spaced differently from the scheduler's own.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.utils.torch_utils import randn_tensor

    from ldm.diffusion.guidance import make_sampler, sample
    from ldm.train.export import read_index

    workdir, _ = trained
    root = workdir / "runs" / "a" / "pipeline"
    unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    index = read_index(root)
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 5, 128, generator=g), torch.randn(1, 5, 128, generator=g)
    steps, scale, shape = 4, 3.0, index["latent_shape"]
    ours = sample(unet, make_sampler("ddim", DDIMScheduler.load_config(root / "scheduler")), cond, None, uncond,
                  None, steps, scale, torch.Generator().manual_seed(7), shape)  # fmt: skip
    sched = DDIMScheduler.from_pretrained(root / "scheduler", timestep_spacing="trailing")
    sched.set_timesteps(steps)
    latents = randn_tensor((2, *shape), generator=torch.Generator().manual_seed(7)) * sched.init_noise_sigma
    context = torch.cat([uncond.expand(2, -1, -1), cond])
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            eps_u, eps_c = unet(x, t, encoder_hidden_states=context).sample.chunk(2)
            latents = sched.step(eps_u + scale * (eps_c - eps_u), t, latents).prev_sample
    torch.testing.assert_close(ours, latents, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_before_any_sampling(trained, tmp_path, capsys):
    """No checkpoint, a missing prompt file, absent extractor weights, a bad grid value: one line each, and
    no eval folder or child run is made.

    Bugs caught: a check that runs after the judge trained or the first point sampled; a traceback.
    """
    from flows.cli import main
    from flows.registry import run

    workdir, cfgs = trained
    shutil.copytree(workdir / "runs" / "a", workdir / "runs" / "nockpt", ignore=shutil.ignore_patterns("eval"))
    m = json.loads((workdir / "runs" / "nockpt" / "manifest.json").read_text())
    m["checkpoint"] = str(tmp_path / "gone")
    (workdir / "runs" / "nockpt" / "manifest.json").write_text(json.dumps(m))
    base = [*RUN, "train.run_id=nockpt"]
    cases = [
        ([], "has no checkpoint"),
        ([f"evaluate.prompts_file={tmp_path}/prompts.txt"], "prompts.txt does not exist"),
        (["evaluate.extractor=inception", f"evaluate.inception_weights={tmp_path}/inc.pth"], "inc.pth does not exist"),
    ]
    for overrides, message in cases:
        with pytest.raises(StageError, match=message) as info:
            run("evaluate", make_config(workdir, *base, *overrides))
        assert "\n" not in str(info.value)
        assert not (workdir / "runs" / "nockpt" / "eval").exists()
    for value in ("evaluate.guidance=[0.5]", "evaluate.samplers=[euler]", "evaluate.steps=[0]"):
        with pytest.raises(ConfigError, match=value.split("=")[0]):
            make_config(workdir, *base, value)
    rc = main(["stage", "evaluate", "--profile", "test", "--workdir", str(workdir), "--set", "evaluate.guidance=[0]"])
    err = capsys.readouterr().err
    assert rc == 2 and "evaluate.guidance" in err and len(err.strip().splitlines()) == 1
