"""load_config: YAML + dotted overrides, validated up front, errors that name the dotted key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipelines.cli.config import RunConfig, load_config, validate_config
from prune.settings import ConfigError, fingerprint

YAML = """\
input: shards/{00000..00003}.tar
output: out/
decode:
  draft: false
embed:
  model: ViT-S-32
  batch_size: 16
select:
  keep_fraction: 0.5
  policy: easy
write:
  samples_per_shard: 100
"""


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    return str(path)


def test_yaml_values_and_defaults(cfg_file):
    cfg = load_config(cfg_file)
    assert isinstance(cfg, RunConfig)
    assert cfg.input == "shards/{00000..00003}.tar" and cfg.output == "out/"
    assert cfg.decode.draft is False
    assert cfg.embed.model == "ViT-S-32" and cfg.embed.batch_size == 16
    assert cfg.select.keep_fraction == 0.5 and cfg.select.policy == "easy"
    assert cfg.write.samples_per_shard == 100
    # untouched keys keep the model defaults
    assert cfg.select.balanced == RunConfig.model_fields["select"].default.balanced
    assert cfg.kmeans == RunConfig.model_fields["kmeans"].default


def test_dotted_overrides_win_over_yaml(cfg_file):
    cfg = load_config(
        cfg_file,
        ["select.keep_fraction=0.25", "select.balanced=true", "embed.batch_size=8", "output=s3://b/x", "kmeans.k=7"],
    )
    assert cfg.select.keep_fraction == 0.25
    assert cfg.select.balanced is True
    assert cfg.select.policy == "easy"  # sibling from the YAML survives the override
    assert cfg.embed.batch_size == 8 and cfg.embed.model == "ViT-S-32"
    assert cfg.output == "s3://b/x"
    assert cfg.kmeans.k == 7


def test_later_override_wins(cfg_file):
    cfg = load_config(cfg_file, ["select.keep_fraction=0.3", "select.keep_fraction=0.4"])
    assert cfg.select.keep_fraction == 0.4


def test_overrides_alone_without_a_file():
    cfg = load_config(None, ["input=a", "output=b", "write.band_step=0.25"])
    assert (cfg.input, cfg.output, cfg.write.band_step) == ("a", "b", 0.25)


@pytest.mark.parametrize(
    "override, key",
    [
        ("select.keep_fractoin=0.5", "select.keep_fractoin"),
        ("embed.modle=ViT-B-32", "embed.modle"),
        ("kmeans.nitre=3", "kmeans.nitre"),
        ("bogus=1", "bogus"),
        ("selection.keep_fraction=0.5", "selection"),
    ],
)
def test_unknown_key_names_the_full_dotted_key(cfg_file, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, [override])
    msg = str(err.value)
    assert f"'{key}'" in msg and "unknown" in msg


def test_unknown_key_in_the_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(YAML + "  kep_fraction: 0.3\n")  # lands under the last section, write:
    with pytest.raises(ConfigError, match=r"'write\.kep_fraction'"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, key",
    [
        ("select.keep_fraction=1.5", "select.keep_fraction"),
        ("select.keep_fraction=0", "select.keep_fraction"),
        ("select.keep_fraction=abc", "select.keep_fraction"),
        ("select.policy=bogus", "select.policy"),
        ("embed.batch_size=0", "embed.batch_size"),
        ("embed.device=tpu", "embed.device"),
        ("write.samples_per_shard=-1", "write.samples_per_shard"),
        ("write.band_step=0", "write.band_step"),
        ("decode.max_image_pixels=0", "decode.max_image_pixels"),
        ("image_extensions=[]", "image_extensions"),
        ("input=' '", "input"),
    ],
)
def test_bad_value_names_the_key(cfg_file, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, [override])
    msg = str(err.value)
    assert f"'{key}'" in msg and "bad value" in msg


def test_all_errors_reported_at_once(cfg_file):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, ["select.keep_fraction=2", "embed.batch_size=0", "select.typo=1"])
    msg = str(err.value)
    for key in ("select.keep_fraction", "embed.batch_size", "select.typo"):
        assert f"'{key}'" in msg


@pytest.mark.parametrize("override", ["select.keep_fraction", "select.keep_fraction0.5", "=0.5", " =1"])
def test_override_must_be_key_equals_value(cfg_file, override):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(cfg_file, [override])


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["input=a"])
    assert "'output'" in str(err.value) and "missing" in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_malformed_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("input: [a\noutput: b\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(str(path))


def test_top_level_list_is_a_config_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path), ["input=x"])


def test_random_init_and_pretrained_exclude_each_other(cfg_file):
    with pytest.raises(ConfigError, match="allow_random_init.*pretrained"):
        load_config(cfg_file, ["embed.allow_random_init=true", "embed.pretrained=laion2b_s34b_b79k"])


def test_image_extensions_are_normalized(cfg_file):
    cfg = load_config(cfg_file, ["image_extensions=[.JPG,png]"])
    assert cfg.image_extensions == ["jpg", "png"]


def test_validate_assignment_keeps_sections_valid(cfg_file):
    cfg = load_config(cfg_file)
    with pytest.raises(ValueError):
        cfg.select.keep_fraction = 3.0


# --- fingerprint ------------------------------------------------------------------------


def test_fingerprint_stable_for_equal_configs(cfg_file):
    a, b = load_config(cfg_file), load_config(cfg_file)
    assert a is not b
    assert fingerprint(a.select) == fingerprint(b.select)
    assert fingerprint("embed", a.embed, a.decode) == fingerprint("embed", b.embed, b.decode)
    # the same values reached by a different route (YAML vs override vs dict) hash the same
    c = load_config(None, ["input=shards/{00000..00003}.tar", "output=out/", "select.keep_fraction=0.5",
                           "select.policy=easy"])
    assert fingerprint(c.select) == fingerprint(a.select)
    d = validate_config(json.loads(a.model_dump_json()))
    assert fingerprint(d) == fingerprint(a)


def test_fingerprint_stable_across_processes(cfg_file):
    """No per-process salt (e.g. Python's hash randomization) may enter the fingerprint."""
    code = (
        "import sys; from pipelines.cli.config import load_config; from prune.settings import fingerprint; "
        "c = load_config(sys.argv[1]); print(fingerprint('x', c.select, c.embed, 0.1))"
    )
    here = load_config(cfg_file)
    expected = fingerprint("x", here.select, here.embed, 0.1)
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code, cfg_file], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        )
        assert out.stdout.strip() == expected


# every select setting: (the overrides under which it is read, another value)
_BUDGETED, _DBP, _STRATIFIED = ["select.balanced=true", "select.budget=capped_equal"], \
    ["select.balanced=true", "select.budget=dbp"], ["select.policy=stratified"]
SELECT_CHANGES = {
    "keep_fraction": ([], 0.51), "policy": ([], "hard"), "balanced": ([], True), "seed": ([], 1),
    "budget": (["select.balanced=true"], "capped_equal"),
    "dbp_temperature": (_DBP, 0.2), "dbp_neighbours": (_DBP, 5), "dbp_min_per_cluster": (_DBP, 1),
    "strata": (_STRATIFIED, 10), "drop_hardest": (_STRATIFIED, 0.1),
    "auto_tail_ratio": (["select.policy=auto"], 4.0),
}


def _select_fp(cfg_file, overrides) -> str:
    """The select stage's fingerprint, as the executor computes it, over a fixed upstream."""
    from pipelines.executor import stage_fingerprint
    from pipelines.stage import STAGES, Context
    from prune.io.storage import OutputDir

    stage = STAGES.get("select").from_config(load_config(cfg_file, overrides))
    return stage_fingerprint(stage, ["assign-fp"], Context(OutputDir("/tmp/unused"), {}))


@pytest.mark.parametrize("name", sorted(SELECT_CHANGES))
def test_the_select_stage_fingerprint_follows_every_select_setting_where_it_is_read(cfg_file, name):
    from prune.select.settings import SelectConfig

    assert set(SELECT_CHANGES) == set(SelectConfig.model_fields)  # a new setting must be listed here
    where, value = SELECT_CHANGES[name]
    change = f"select.{name}={json.dumps(value)}"
    assert _select_fp(cfg_file, [*where, change]) != _select_fp(cfg_file, where)
    if where:  # elsewhere it is a no-op: it moves no fingerprint (selections made before it keep theirs)
        assert _select_fp(cfg_file, [change]) == _select_fp(cfg_file, [])


def test_fingerprint_sensitive_to_parts_and_order(cfg_file):
    cfg = load_config(cfg_file)
    other = load_config(cfg_file, ["embed.model=ViT-B-32"])
    assert fingerprint(cfg.embed) != fingerprint(other.embed)
    assert fingerprint("a", cfg.select) != fingerprint("b", cfg.select)
    assert fingerprint(cfg.select, cfg.write) != fingerprint(cfg.write, cfg.select)
    assert fingerprint(cfg.select, 0.1) != fingerprint(cfg.select, 0.2)
    # an unrelated section does not move a fingerprint that does not include it
    assert fingerprint(cfg.select) == fingerprint(other.select)
    assert len(fingerprint(cfg)) == 16 and set(fingerprint(cfg)) <= set("0123456789abcdef")


def test_a_retired_key_says_why_it_went(cfg_file):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, ["embed.shards_per_round=8"])
    msg = str(err.value)
    assert "embed" in msg and "shards_per_round is retired" in msg and "remove the key" in msg


def test_embed_batch_follows_the_device_unless_set():
    from prune.embed.settings import CPU_BATCH, OTHER_BATCH, EmbedConfig

    assert (EmbedConfig().batch_for("cpu"), EmbedConfig().batch_for("cuda")) == (CPU_BATCH, OTHER_BATCH)
    assert CPU_BATCH < OTHER_BATCH  # CPU actors run smaller batches: their activations stay in cache
    assert EmbedConfig(batch_size=7).batch_for("cuda") == EmbedConfig(batch_size=7).batch_for("cpu") == 7
