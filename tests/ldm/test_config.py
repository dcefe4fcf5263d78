"""The typed config: profiles validate, overrides are typed, bad config exits 2 naming the field."""

from __future__ import annotations

import pytest
import yaml

from flows.cli import main
from ldm.config import ConfigError, PipelineConfig, load_config, profiles


@pytest.mark.parametrize("profile", ["local", "test", "prod"])
def test_every_profile_validates(profile):
    cfg = load_config(profile)
    assert isinstance(cfg, PipelineConfig)
    assert profile in profiles()


def test_prod_profile_is_laion_scale_with_local_weights():
    cfg = load_config("prod")
    assert cfg.source.kind == "parquet" and cfg.source.paths[0].startswith("s3://")
    assert cfg.ingest.url_policy == "public" and cfg.compute.use_gpu
    assert cfg.clip.weights and cfg.aesthetic.weights and cfg.vae.path  # weights by path, never a hub name
    assert {"similarity", "pwatermark", "punsafe"} <= set(cfg.ingest.columns.extra)


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
