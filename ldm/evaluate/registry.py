"""The best grid point as an MLflow pyfunc model (prompt in, image out) in the Model Registry, alias `candidate`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc

SAMPLING = "sampling.json"  # guidance, steps and sampler of the registered point, inside the model's pipeline
ALIAS = "candidate"


class PipelineModel(mlflow.pyfunc.PythonModel):
    """The exported pipeline behind pyfunc: predict(prompts) -> uint8 images [N, H, W, 3]."""

    def load_context(self, context) -> None:
        """Load the UNet, VAE, scheduler and text encoder from the model's pipeline artefact."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from ldm.diffusion.guidance import make_sampler
        from ldm.train.export import load_text_encoder, read_index

        root = Path(context.artifacts["pipeline"])
        self.index = read_index(root)
        self.sampling = json.loads((root / SAMPLING).read_text())
        self.unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
        self.vae = AutoencoderKL.from_pretrained(root / "vae").eval()
        train_scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        self.scheduler = make_sampler(self.sampling["sampler"], train_scheduler.config)
        self.text = load_text_encoder(root, self.index)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        """Images for prompts (a list of strings, or a DataFrame with a `prompt` column); params may set seed."""
        import torch

        from ldm.diffusion.guidance import sample
        from ldm.diffusion.objective import fit_to_length
        from ldm.evaluate.sweep import to_uint8
        from ldm.train.export import decode

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        states, lengths = self.text.token_states(prompts)
        empty, empty_len = self.text.token_states([""])
        e_states, e_mask = fit_to_length(empty[0], int(empty_len[0]), states.shape[1])
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        g = torch.Generator().manual_seed(int((params or {}).get("seed", 0)))
        s = self.sampling
        latents = sample(self.unet, self.scheduler, states, mask, e_states[None], e_mask[None], s["steps"],
                         s["guidance"], g, self.index["latent_shape"])  # fmt: skip
        return to_uint8(decode(self.vae, latents, self.index["scale_factor"]))


PIP_REQUIREMENTS = ["torch", "diffusers", "transformers", "open_clip_torch", "safetensors", "numpy"]


def register_best(client, name: str, run_id: str, pipeline_dir: Path, unet, point: dict, point_key: str) -> str:
    """Register the point's pipeline under `name` (once per point key) and move alias `candidate` to it."""
    import mlflow

    for v in client.search_model_versions(f"name = '{name}'"):
        if v.tags.get("point_key") == point_key:  # this very point is registered already
            client.set_registered_model_alias(name, ALIAS, v.version)
            return str(v.version)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pipeline"
        shutil.copytree(pipeline_dir, root)
        if point["checkpoint"] != "ema":  # the export holds the EMA weights; the raw ones replace them
            shutil.rmtree(root / "unet")
            unet.save_pretrained(root / "unet", safe_serialization=True)
        sampling = {k: point[k] for k in ("guidance", "steps", "sampler", "checkpoint")}
        (root / SAMPLING).write_text(json.dumps(sampling))
        # The fluent API logs to the process-wide store: point it at the client's (the sweep's) store, or the
        # model lands in ./mlruns when no earlier stage of this process set it (a rerun that skipped them).
        mlflow.set_tracking_uri(client.tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="pipeline",
                python_model=PipelineModel(),
                artifacts={"pipeline": str(root)},
                # Explicit: MLflow would otherwise infer them by importing the model (seconds, more with torch).
                pip_requirements=PIP_REQUIREMENTS,
            )
    version = mlflow.register_model(info.model_uri, name)
    for k, v in {**{f"point.{k}": str(v) for k, v in point.items()}, "point_key": point_key,
                 "point_run_id": run_id}.items():  # fmt: skip
        client.set_model_version_tag(name, version.version, k, v)
    client.set_registered_model_alias(name, ALIAS, version.version)
    return str(version.version)
