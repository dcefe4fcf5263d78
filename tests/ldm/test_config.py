"""The typed config: profiles validate, overrides are typed, bad config exits 2 naming the field."""

from __future__ import annotations

import re

import pytest
import yaml

from flows.cli import main
from ldm.config import ConfigError, PipelineConfig, latent_resolution, load_config, phase_configs, profiles


@pytest.mark.parametrize("profile", ["local", "test", "prod"])
def test_every_profile_validates(profile):
    cfg = load_config(profile)
    assert isinstance(cfg, PipelineConfig)
    assert profile in profiles()


def test_prod_profile_is_laion_scale_with_local_weights():
    """Every prod weight is a local absolute path of the public format its loader reads, not just "set".

    Bugs caught: a hub tag ("openai", "laion2b_s32b_b79k", "hf-hub:...") that open_clip or diffusers would
    download at run time; a relative path that resolves against whatever cwd the Ray worker has; the VAE given
    as a single file where the loader wants a diffusers folder; the LAION MLP named by its .bin CLIP sibling;
    the scale fields left at the embedded default's values (the test world's 32 px, the tiny UNet, 1 process).
    """
    from pathlib import PurePosixPath

    cfg = load_config("prod")
    assert cfg.source.kind == "parquet" and all(p.startswith("s3://") for p in cfg.source.paths)
    assert cfg.ingest.url_policy == "public" and cfg.compute.use_gpu
    weights = {
        "clip.weights": cfg.clip.weights,
        "aesthetic.weights": cfg.aesthetic.weights,
        "text_encoder.weights": cfg.text_encoder.weights,
        "vae.path": cfg.vae.path,
    }
    for field, value in weights.items():
        assert isinstance(value, str) and PurePosixPath(value).is_absolute(), field
        assert ":" not in value and "://" not in value, field  # no hub prefix, no URL scheme
    for field in ("clip.weights", "text_encoder.weights"):
        assert PurePosixPath(weights[field]).suffix in {".bin", ".pt", ".pth", ".safetensors"}, field
    assert PurePosixPath(cfg.aesthetic.weights).suffix == ".pth"  # the LAION MLP's published state dict
    assert PurePosixPath(cfg.vae.path).suffix == "" and cfg.vae.downsample == 8  # diffusers folder, SD's f=8
    assert {"similarity", "pwatermark", "punsafe"} <= set(cfg.ingest.columns.extra)
    # One download at the largest phase's resolution (SD 2 base: 256, then 512 px from the same images)
    phases = phase_configs(cfg)
    assert [latent_resolution(p) for p in phases] == [256, 512] == [256, cfg.ingest.resolution]
    assert phases[1].unet.init_from == f"runs/{phases[0].train.run_id}"
    assert cfg.unet.size == "sd2-base" and cfg.compute.num_workers > 2
    # upscaled thumbnails would be trained on otherwise (at the first phase's resolution: see prod.yaml)
    assert cfg.ingest.prefilter.min_size == latent_resolution(phases[0])
    # SD 2's conditioning, so a release continues on these latents and the export round-trips in diffusers
    assert (cfg.text_encoder.blocks, cfg.text_encoder.mask_padding, cfg.diffusion.prediction_type) == (
        None, False, "epsilon")  # fmt: skip
    test = load_config("test")
    assert cfg.ingest.processes > test.ingest.processes and cfg.ingest.samples_per_shard >= 1000


def test_prod_scorer_and_text_encoder_are_sd2s_two_clips():
    """Catches prod naming one CLIP for both jobs (ViT-H-14's 1024-d embeddings into the 768-d LAION MLP).

    Widths come from the model configs open_clip ships, so a renamed arch is checked, not trusted.
    """
    import open_clip

    cfg = load_config("prod")
    scorer, tau = open_clip.get_model_config(cfg.clip.arch), open_clip.get_model_config(cfg.text_encoder.arch)
    assert scorer["embed_dim"] == cfg.aesthetic.input_size == 768  # the public MLP's input width
    assert scorer.get("quick_gelu")  # OpenAI's ViT-L/14, which the LAION MLP was fitted on, uses QuickGELU
    assert cfg.text_encoder.arch == "ViT-H-14" and tau["text_cfg"]["width"] == 1024  # SD 2's conditioning width
    assert cfg.text_encoder.weights and cfg.text_encoder.weights != cfg.clip.weights


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["clip.arch=ViT-H-14"], "aesthetic.input_size 768 != the embedding width 1024 of clip.arch 'ViT-H-14'"),
        (["aesthetic.input_size=1024"], "aesthetic.input_size 1024 != the embedding width 768 of clip.arch"),
    ],
)
def test_aesthetic_width_must_match_the_scorer_clip(overrides, expected):
    """Catches a prod profile that would only fail at train-aesthetic, after ingest and train-clip ran."""
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config("prod", overrides)


def test_tiny_scorer_width_is_checked_and_unset_width_follows_the_clip():
    with pytest.raises(ConfigError, match="aesthetic.input_size 768 != the embedding width 128 of clip.arch 'tiny'"):
        load_config("local", ["aesthetic.input_size=768"])
    assert load_config("local", ["aesthetic.input_size=128"]).aesthetic.input_size == 128
    assert load_config("local").text_encoder.same_as_clip


def test_named_text_encoder_needs_weights():
    with pytest.raises(ConfigError, match="text_encoder.arch 'ViT-H-14' needs text_encoder.weights"):
        load_config("local", ["text_encoder.arch=ViT-H-14"])


def test_overrides_are_typed_and_workdir_wins():
    cfg = load_config("test", ["ingest.threads=3", "ingest.timeout_s=0.5", "source.broken.http_404=0"], "s3://b/w")
    assert cfg.ingest.threads == 3 and isinstance(cfg.ingest.threads, int)
    assert cfg.ingest.timeout_s == 0.5
    assert cfg.source.broken.http_404 == 0
    assert cfg.workdir == "s3://b/w"


def test_switching_source_kind_drops_the_other_kinds_fields():
    cfg = load_config("test", ["source.kind=parquet", "source.paths=[/data/a.parquet]"])
    assert cfg.source.kind == "parquet" and cfg.source.paths == ["/data/a.parquet"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "ingest.bogus=1"], "ingest.bogus: unknown key"),
        (["--set", "ingest.threads=many"], "ingest.threads: Input should be a valid integer"),
        (["--set", "ingest.resolution=0"], "ingest.resolution: Input should be greater than or equal to 8"),
        (["--set", "ingest.url_policy=anything"], "ingest.url_policy: Input should be 'public' or 'loopback'"),
        (["--set", "source.broken.zero_bytes=-1"], "source.broken.zero_bytes: Input should be greater than"),
        (["--profile", "nope"], "profile: unknown profile 'nope'"),
        (["--set", "novalue"], "novalue: override must look like a.b=value"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_field(args, expected, capsys, tmp_path):
    workdir = tmp_path / "w"
    rc = main(["stage", "ingest", "--workdir", str(workdir), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and expected in err, err
    assert not workdir.exists()  # refused before any work started


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "--profile", "test", "--set", "ingest.threads=5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["ingest"]["threads"] == 5
    assert PipelineConfig.model_validate(shown) == load_config("test", ["ingest.threads=5"])


def test_config_error_carries_the_path():
    with pytest.raises(ConfigError) as e:
        load_config("test", ["source.num_samples=5"])
    assert e.value.path == "source.num_samples"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["tracking.uri=http://alice:s3cr3t-pw@127.0.0.1:5000"], "tracking.uri"),
        (["compute.ray_address=ray://bob:s3cr3t-pw@127.0.0.1:10001"], "compute.ray_address"),
        (["source.kind=parquet", "source.paths=[s3://k:s3cr3t-pw@bucket/urls.parquet]"], "source.paths[0]"),
    ],
)
def test_a_password_in_a_url_is_refused_and_never_printed(overrides, field, capsys, tmp_path):
    # Bug caught: a credential in a URL field echoed by `ldm config show` (and then written into every
    # manifest and MLflow param): config load must refuse it, naming the field, without repeating it.
    args = ["config", "show", "--profile", "test", "--workdir", str(tmp_path)]
    assert main([*args, *(a for o in overrides for a in ("--set", o))]) == 2
    out, err = capsys.readouterr()
    assert field in err and "password" in err
    assert "s3cr3t-pw" not in out + err


def test_a_user_name_alone_is_not_a_credential(capsys, tmp_path):
    # Bug caught: a pattern so broad it refuses ordinary URLs (user names, ports, s3 keys with colons).
    assert main(["config", "show", "--profile", "test", "--set", "tracking.uri=http://alice@127.0.0.1:5000"]) == 0
    assert "alice@127.0.0.1:5000" in capsys.readouterr().out
