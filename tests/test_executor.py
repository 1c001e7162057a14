"""The executor: fingerprints over what each stage reads, skip-if-complete, splits, the stage order;
and the fingerprints of the shipped demo config pinned, so outputs of earlier versions stay reusable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from pipelines.cli.config import load_config, validate_config
from pipelines.executor import dependencies, execute, stage_fingerprint
from pipelines.stage import Context, Stage
from prune.io.storage import OutputDir
from prune.settings import ConfigError, Section

from .conftest import REPO, small_config


class CountSettings(Section):
    value: int = 1


@dataclass
class Counted:
    wrote: bool


@dataclass
class WriteValue(Stage):
    """Writes `<name>.txt` holding its value and fingerprint; complete when that file matches."""

    name = "writes_value"
    count: CountSettings = field(default_factory=CountSettings)
    split: str = ""
    calls: list = field(default_factory=list, compare=False, repr=False)

    def identity(self, ctx):
        return (self.count,)

    def complete(self, ctx):
        f = f"{self.name}.json"
        if ctx.out.exists(f) and ctx.out.read_json(f)["fingerprint"] == ctx.fingerprint:
            return Counted(False)
        return None

    def run(self, ctx):
        self.calls.append(ctx.fingerprint)
        ctx.out.write_json({"fingerprint": ctx.fingerprint, "value": self.count.value}, f"{self.name}.json")
        return Counted(True)


@dataclass
class ReadValue(WriteValue):
    name = "reads_value"
    reads = ("writes_value",)

    def identity(self, ctx):
        return None  # its output is a function of the upstream's


def _ctx(tmp_path, splits=()):
    out = OutputDir(str(tmp_path))
    return Context(out, {"00000": "a.tar"}, splits={s: Context(out.sub(s), {"00000": f"{s}.tar"}) for s in splits})


def test_fingerprints_chain_and_complete_stages_are_skipped(tmp_path):
    a, b = WriteValue(), ReadValue()
    first = execute([a, b], _ctx(tmp_path))
    assert first.reused == {"writes_value": False, "reads_value": False}
    assert first.fingerprints["reads_value"] == first.fingerprints["writes_value"]  # identity None: passes through
    seen = []
    again = execute([a, b], _ctx(tmp_path), on_stage_done=lambda label, stats: seen.append((label, set(stats))))
    # told after each stage, reused or not, with the stats of every stage done so far
    assert seen == [("writes_value", {"writes_value"}), ("reads_value", {"writes_value", "reads_value"})]
    assert again.reused == {"writes_value": True, "reads_value": True} and len(a.calls) == len(b.calls) == 1
    assert again.stats_dict()["writes_value"] == {"wrote": False, "reused": True}
    changed = execute([WriteValue(CountSettings(value=2)), b], _ctx(tmp_path))
    # a new setting upstream: that stage and everything after it run again
    assert changed.reused == {"writes_value": False, "reads_value": False}
    assert changed.fingerprints["writes_value"] != first.fingerprints["writes_value"]
    assert set(changed.timings_s) == {"writes_value", "reads_value"}


def test_splits_chain_separately_and_later_stages_see_earlier_fingerprints(tmp_path):
    seen = {}

    @dataclass
    class Peek(WriteValue):
        name = "peek"

        def identity(self, ctx):
            seen.update(ctx.earlier_fingerprints)
            return (sorted(ctx.earlier_fingerprints.items()),)

    stages = [WriteValue(split="train"), WriteValue(CountSettings(value=3), split="test"), Peek()]
    done = execute(stages, _ctx(tmp_path, splits=("train", "test")))
    assert list(done.stats) == ["writes_value:train", "writes_value:test", "peek"]
    assert (tmp_path / "train" / "writes_value.json").exists() and (tmp_path / "test" / "writes_value.json").exists()
    # each split's first stage starts its own chain: same settings, same fingerprint, whatever the split
    assert done.fingerprints["writes_value:train"] == stage_fingerprint(WriteValue(), "", _ctx(tmp_path))
    assert seen == {k: v for k, v in done.fingerprints.items() if k != "peek"}


def test_a_stage_list_must_name_what_each_stage_reads_before_it(tmp_path):
    for stages, msg in ((["select", "write"], "'select' needs 'assign', 'prototypes'"),
                        (["embed", "prototypes", "assign", "write"], "'write' needs 'select'"),
                        (["write", "embed", "prototypes", "assign", "select"], "'write' needs 'select'"),
                        (["embed", "prototypes", "assign", "assign", "select"], "'assign' is listed twice"),
                        ([], "at least one stage")):
        with pytest.raises(ConfigError, match=msg):
            validate_config(small_config(tmp_path, tmp_path, stages=stages))
    assert validate_config(small_config(tmp_path, tmp_path, stages=["embed", "prototypes"])).stages == ["embed", "prototypes"]


def test_unknown_names_list_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown embed\.backend 'clip'; known: local, open_clip, timm"):
        validate_config(small_config(tmp_path, tmp_path, **{"embed.backend": "clip"}))
    from pipelines.cli.config import EvaluateConfig

    raw = {"output": "o", "train_input": "a", "test_input": "b", "evaluate": {"policies": ["hard", "balanced-hardest"]}}
    with pytest.raises(ConfigError, match=r"evaluate\.policies.*unknown select\.policy 'hardest'; known: easy, hard, random"):
        validate_config(raw, EvaluateConfig)


# the fingerprints the code before the stage redesign computed for configs/demo.yaml over three
# shards (and for a variant): outputs made by earlier versions are reused, not recomputed
SHARDS = {f"{i:05d}": f"/data/shards/{i:05d}.tar" for i in range(3)}
# (configs/demo.yaml then selected with the balanced hard policy and no dedup: the first overrides)
OLD_DEMO = ["stages=[embed,prototypes,assign,select,write]", "select.policy=hard", "select.balanced=true"]
PINNED = [
    (OLD_DEMO, ("b508322b49da8b1b", "56d7a4ceafaf0cd9", "d9d9ae7fbee18c63", "dbb6394a5a854a06")),
    (OLD_DEMO[:1] + ["select.policy=random", "select.balanced=false", "kmeans.refine_iters=3", "write.band_step=0.25"],
     ("b508322b49da8b1b", "f72bcacf4df5242e", "c1b46ebbf9098bfa", "81b34fff881daf55")),
]


@pytest.mark.parametrize("overrides, pinned", PINNED)
def test_demo_fingerprints_are_those_of_earlier_versions(overrides, pinned, monkeypatch):
    monkeypatch.chdir(REPO)  # the demo config names the shipped encoder by a relative path
    cfg = load_config("configs/demo.yaml", overrides)
    ctx = Context(OutputDir("/tmp/unused"), SHARDS)
    fps = job_fingerprints(cfg.stage_list(), ctx)
    assert (fps["embed"], fps["prototypes"], fps["select"], fps["write"]) == pinned
    assert fps["assign"] == fps["prototypes"]


def job_fingerprints(stages, ctx) -> dict:
    """Every stage's fingerprint, as the executor computes them (over what each stage reads)."""
    fps: list = []
    for stage, reads in zip(stages, dependencies(stages)):
        fps.append(stage_fingerprint(stage, [fps[j] for j in reads], dataclasses.replace(ctx)))
    return {s.name: fp for s, fp in zip(stages, fps)}


def _fps(*overrides, stages="[embed,prototypes,assign,dedup,filter,select,export,write]"):
    cfg = load_config("configs/demo.yaml", [f"stages={stages}", *overrides])
    return job_fingerprints(cfg.stage_list(), Context(OutputDir("/tmp/unused"), SHARDS))


@pytest.mark.parametrize("override, changed", [
    ("export.columns=[url]", {"export"}),  # ids only: the pruned shards are not written again
    ("export.id_col=uid", {"assign", "dedup", "filter", "select", "export", "write"}),  # the assignment carries it
    ("dedup.eps=0.02", {"dedup", "filter", "select", "export", "write"}),  # filter skips what dedup removed
    ("dedup.block_rows=64", set()),  # placement only
    ("filter.min_caption_words=3", {"filter", "select", "export", "write"}),
    ("select.keep_fraction=0.5", {"select", "export", "write"}),
    ("write.samples_per_shard=100", {"write"}),
    ("write.copy_from=staged", set()),
    ("write.band_step=0.2", {"select", "export", "write"}),  # select cuts the bands
    ("kmeans.assign_concurrency=3", set()),
    ("kmeans.niter=5", {"prototypes", "assign", "dedup", "filter", "select", "export", "write"}),
    ("embed.batch_size=7", set()),
])
def test_a_setting_re_runs_its_stage_and_what_reads_it_nothing_else(override, changed, monkeypatch):
    monkeypatch.chdir(REPO)
    base, other = _fps(), _fps(override)
    assert {name for name in base if base[name] != other[name]} == changed


def test_the_fingerprint_covers_the_stages_read_not_the_list_position(monkeypatch):
    monkeypatch.chdir(REPO)
    # export before or after write: neither reads the other
    a = _fps(stages="[embed,prototypes,assign,select,export,write]")
    b = _fps(stages="[embed,prototypes,assign,select,write,export]")
    assert a == b
    # a curation stage dropped from the list: select and what reads it change, the rest does not
    c = _fps(stages="[embed,prototypes,assign,dedup,select,write]")
    d = _fps(stages="[embed,prototypes,assign,select,write]")
    assert {n for n in d if c[n] != d[n]} == {"select", "write"}


@pytest.mark.parametrize("stages, fixed", [
    (["embed", "prototypes", "assign", "select", "dedup", "write"],
     "stages=[embed, prototypes, assign, dedup, select, write]"),
    (["embed", "prototypes", "assign", "dedup", "select", "write", "filter"],
     "stages=[embed, prototypes, assign, dedup, filter, select, write]"),
])
def test_a_curation_stage_after_select_is_refused_in_one_line_naming_the_fix(tmp_path, stages, fixed):
    with pytest.raises(ConfigError) as err:
        validate_config(small_config(tmp_path, tmp_path, stages=stages))
    message = str(err.value)
    assert "comes after 'select'" in message and fixed in message and "\n" not in message
    fixed_list = fixed.removeprefix("stages=[").removesuffix("]").split(", ")
    assert validate_config(small_config(tmp_path, tmp_path, stages=fixed_list)).stages == fixed_list


def test_the_executor_checks_the_order_of_a_list_built_in_python(tmp_path):
    """The config is not the only way in: a stage list handed to `execute` is checked too."""
    from pipelines.stage import STAGES

    stages = [STAGES.get(n)() for n in ("embed", "prototypes", "assign", "select", "dedup", "write")]
    with pytest.raises(ValueError, match="curation stage 'dedup' comes after 'select'"):
        execute(stages, _ctx(tmp_path), checked=True)
    assert not list(tmp_path.iterdir())  # refused before any work
