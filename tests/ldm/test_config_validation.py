"""Config validation, message by message: the cross-field checks, overrides, profile loading and the error shape.

Each message is matched whole where a user acts on it: a check that fires on the wrong condition, suggests the
wrong value or names the wrong field is a bug a substring match lets through. `make mutation` runs these.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from ldm.config import (
    ConfigError,
    PipelineConfig,
    conf_dir,
    load_config,
    open_clip_embed_dim,
    parse_override,
    profiles,
    to_yaml,
)

ROOT = Path(__file__).resolve().parents[2]


def _error(profile: str, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_config(profile, list(overrides))
    return e.value


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Bugs caught: the resnet's 32x step confused with the ViT's patch, suggestions off by one step,
        # a suggestion below the step (resolution 8 with 16 px patches must suggest 16, not 0).
        (["ingest.resolution=48"],
         "ingest.resolution 48 is not a multiple of 32 (clip.vision=resnet downsamples 32x); use 32 or 64"),
        (["ingest.resolution=36", "clip.vision=vit"],
         "ingest.resolution 36 is not a multiple of 8 (clip.patch_size is 8); use 32 or 40"),
        (["ingest.resolution=8", "clip.vision=vit", "clip.patch_size=16"],
         "ingest.resolution 8 is not a multiple of 16 (clip.patch_size is 16); use 16 or 16"),
        # The CLIP takes 18 px (6 px patches) but the trained VAE (f=4) cannot: its latents would leave pixels out.
        (["ingest.resolution=18", "clip.vision=vit", "clip.patch_size=6"],
         "ingest.resolution 18 is not a multiple of vae.downsample 4; the latents would not cover the image"),
    ],
)  # fmt: skip
def test_resolution_checks_name_the_step_and_suggest_neighbours(overrides, message):
    e = _error("test", *overrides)
    assert str(e) == message and e.path == "" and e.reason == message  # not prefixed "Value error, "


def test_resolution_checks_skip_what_they_cannot_know():
    """Bugs caught: a named CLIP (which resizes to its own input size) held to the tiny one's patch grid, or a
    given VAE folder held to vae.downsample (its factor is read from the folder)."""
    assert load_config("prod", ["ingest.resolution=260"]).ingest.resolution == 260
    assert load_config("test", ["ingest.resolution=64", "clip.vision=vit"]).clip.patch_size == 8


def test_aesthetic_width_message_is_whole():
    """Bug caught: the refusal losing the reason the user needs (which MLP wants which width)."""
    e = _error("local", "aesthetic.input_size=768")
    assert str(e) == (
        "aesthetic.input_size 768 != the embedding width 128 of clip.arch 'tiny': the MLP scores that CLIP's "
        "image embeddings (the public LAION MLP wants 768, OpenAI ViT-L-14)"
    )


def test_credential_message_names_the_field_from_the_top():
    """Bug caught: dotted paths built wrongly (".tracking.uri", or the leaf alone) so the user cannot find it."""
    e = _error("test", "tracking.uri=http://u:pw@127.0.0.1:5000")
    assert str(e) == (
        "tracking.uri has a password in its URL; the config is printed, recorded in manifests and logged to "
        "MLflow, so pass credentials in the environment instead (AWS_*, MLFLOW_TRACKING_USERNAME/_PASSWORD)"
    )
    e = _error("test", "source.kind=parquet", "source.paths=[/a.parquet, 'https://u:pw@h/b.parquet']")
    assert str(e).startswith("source.paths[1] has a password")


def test_config_error_shape():
    """Bugs caught: an empty path printed as ": reason"; `reason` not kept for callers that reformat it."""
    assert str(ConfigError("", "why")) == "why" and ConfigError("", "why").reason == "why"
    e = ConfigError("a.b", "why")
    assert (str(e), e.path, e.reason) == ("a.b: why", "a.b", "why")


def test_embed_dim_from_the_live_registry_or_the_shipped_json(tmp_path, monkeypatch):
    """Bugs caught: ignoring an architecture registered at run time (add_model_config: the tests' and prod's
    custom archs), failing when open_clip is not imported yet (flows/ never imports it), a hub or local-dir name
    read as an arch (open_clip would download it), a crash when open_clip is not installed."""
    for name in ("hf-hub:laion/CLIP-ViT-H-14", "local-dir:/models/x", "org/name"):
        assert open_clip_embed_dim(name) is None
    import open_clip

    (tmp_path / "ldm-test-embed-48.json").write_text(json.dumps({**open_clip.get_model_config("ViT-B-32"),
                                                                 "embed_dim": 48}))  # fmt: skip
    open_clip.add_model_config(tmp_path / "ldm-test-embed-48.json")
    assert open_clip_embed_dim("ldm-test-embed-48") == 48  # only the live registry knows it
    assert open_clip_embed_dim("ViT-B-32") == 512 and open_clip_embed_dim("no-such-arch") is None
    monkeypatch.delitem(sys.modules, "open_clip")  # not imported: read the JSON the package ships
    assert open_clip_embed_dim("ViT-L-14") == 768 and open_clip_embed_dim("ViT-H-14") == 1024
    assert open_clip_embed_dim("ldm-test-embed-48") is None and open_clip_embed_dim("no-such-arch") is None
    monkeypatch.setitem(sys.modules, "open_clip", None)  # how Python marks a module that cannot be imported
    assert open_clip_embed_dim("ViT-L-14") is None


def test_overrides_split_at_the_first_equals_and_keep_empty_values():
    """Bugs caught: a value containing "=" split at the last one; an empty value read as None or mangled; a
    YAML error reported without the key."""
    assert parse_override(" a.b =c=d") == ("a.b", "c=d")
    assert parse_override("a.b=") == ("a.b", "")
    assert parse_override("a.b= [1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError) as e:
        parse_override("a.b=[1,")
    assert str(e.value) == "a.b: value '[1,' is not valid YAML (ParserError)"
    with pytest.raises(ConfigError) as e:
        load_config("test", ["ingest.threads.x=1"])
    assert (e.value.path, e.value.reason) == ("ingest.threads.x", "'threads' is a value, not a section")


def test_validation_errors_name_the_field_and_the_value():
    """Bugs caught: the source kind ("parquet") left in the dotted path; the bad value not echoed; an echo of
    the input for a missing field (there is none)."""
    e = _error("test", "ingest.threads=many")
    assert (
        str(e) == "ingest.threads: Input should be a valid integer, unable to parse string as an integer (got 'many')"
    )
    e = _error("test", "source.kind=parquet", "source.paths=5")
    assert e.path == "source.paths" and e.reason.endswith("(got 5)")
    e = _error("test", "source.kind=parquet")
    assert (e.path, e.reason) == ("source.paths", "Field required")


def test_switching_source_kind_only_resets_on_a_change():
    """Bug caught: `source.kind=synthetic` on a synthetic profile wiping its settings back to the defaults."""
    assert load_config("test", ["source.kind=synthetic"]).source.num_samples == 120
    assert load_config("test", ["source.kind=synthetic", "source.num_samples=50"]).source.num_samples == 50


def test_profiles_come_from_conf_or_ldm_conf_dir(tmp_path, monkeypatch):
    """Bugs caught: the profile folder looked up elsewhere than the repository's conf/; LDM_CONF_DIR ignored;
    a broken or non-mapping profile ending in a traceback instead of a ConfigError naming the file."""
    assert conf_dir() == Path(__import__("ldm").__file__).resolve().parents[1] / "conf"
    assert {"local", "prod", "test"} <= set(profiles())
    e = _error("nope")
    assert str(e) == f"profile: unknown profile 'nope' (have: {', '.join(profiles())})"
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "empty.yaml").write_text("")
    monkeypatch.setenv("LDM_CONF_DIR", str(tmp_path))
    assert profiles() == ["broken", "empty", "list"]
    e = _error("broken")
    assert e.path == "profile" and e.reason.startswith(f"{tmp_path}/broken.yaml is not valid YAML: ")
    e = _error("list")
    assert (e.path, e.reason) == ("profile", f"{tmp_path}/list.yaml must hold a mapping")
    assert load_config("empty").workdir == PipelineConfig().workdir  # an empty profile is all defaults


def test_to_yaml_keeps_schema_order_and_round_trips():
    """Bugs caught: keys sorted (the printed config no longer reads top-down like the profile); Python objects
    dumped that `config show | ldm ...` cannot read back."""
    cfg = load_config("test")
    text = to_yaml(cfg)
    assert list(yaml.safe_load(text)) == list(PipelineConfig.model_fields)
    assert PipelineConfig.model_validate(yaml.safe_load(text)) == cfg


def test_phases_chain_each_run_to_the_previous_one_and_refuse_what_would_not_load():
    """Bugs: a phase started from itself or from the first phase instead of the one before; a phase's own
    init_from overwritten; a phase that cannot load (or shares a run folder) found only when it starts."""
    from ldm.config import phase_overrides

    three = "phases=[{precompute.resolution: 16, train.run_id: a}, {train.run_id: b}, "
    three += "{train.run_id: c, unet.init_from: /x}]"
    cfg = load_config("test", [three])
    assert phase_overrides(cfg) == [
        ["precompute.resolution=16", 'train.run_id="a"'],
        ['train.run_id="b"', "unet.init_from=runs/a"],
        ['train.run_id="c"', 'unet.init_from="/x"'],
    ]
    assert load_config("test", [three, *phase_overrides(cfg)[1]]).unet.init_from == "runs/a"
    assert str(_error("test", "phases=[{train.steps: 3}]")) == (
        "phases[0]: each phase names its train.run_id (its runs/<id> folder)"
    )
    assert (
        str(_error("test", "phases=[{train.run_id: a}, {train.run_id: a}]"))
        == "phases: two phases share train.run_id 'a'"
    )
    assert str(_error("test", "phases=[{train.run_id: a}, {train.run_id: b, precompute.resolution: 64}]")) == (
        "phases[1]: precompute.resolution 64 is above ingest.resolution 32: the images are kept at ingest.resolution, "
        "so ingest at the largest resolution any phase needs"
    )
    assert str(_error("test", "phases=[{train.run_id: a, train.steps: 0}]")).startswith("phases[0].train.steps: ")
    assert str(_error("test", "precompute.resolution=18")) == (
        "precompute.resolution 18 is not a multiple of vae.downsample 4; the latents would not cover the image"
    )
    assert load_config("test", ["precompute.resolution=16"]).precompute.resolution == 16
