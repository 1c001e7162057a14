"""The web-like pool is what it claims: long-tailed classes, altered near-copies of popular
originals that are themselves in the pool, off-distribution junk, in img2dataset's layout."""

import glob
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipelines.cli import main
from prune import schema
from prune.demo.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from prune.demo.web_like import (
    COMPOSITION_FILE,
    JUNK_LABEL,
    JUNK_LABEL_NAME,
    JUNK_PATTERNS,
    KIND_COPY,
    KIND_JUNK,
    KIND_ORIGINAL,
    KINDS,
    write_web_like_shards,
)
from prune.io.shards import read_shard

from .conftest import REPO, subprocess_env

COUNT, SHARD_SIZE, SEED = 1200, 400, 5
EXTS = tuple(schema.IMAGE_EXTENSIONS_DEFAULT)


def read_tar(path):
    """[(member name, bytes)] in tar order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def pixels_of(jpg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpg)) as im:
        return np.asarray(im, dtype=np.float64)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def dark_share(pixels: np.ndarray) -> float:
    """Fashion-MNIST is a bright object on black: at least a quarter of its pixels are dark."""
    return float((pixels < 30).mean())


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    out = tmp_path_factory.mktemp("web_like")
    return out, write_web_like_shards(str(out), count=COUNT, shard_size=SHARD_SIZE, seed=SEED)


@pytest.fixture(scope="module")
def samples(pool):
    """[(key, meta, jpg bytes)] over all shards, in pool order."""
    out = []
    for tar in pool[1].tars:
        members = dict(read_tar(tar))
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                out.append((key, json.loads(data), members[f"{key}.jpg"]))
    return out


def of_kind(samples, kind):
    return [(k, m, jpg) for k, m, jpg in samples if m["kind"] == kind]


def test_counts_per_kind_match_the_shares(pool, samples):
    out, built = pool
    kinds = {kind: len(of_kind(samples, kind)) for kind in KINDS}
    assert len(samples) == COUNT and kinds == {KIND_ORIGINAL: 804, KIND_COPY: 360, KIND_JUNK: 36}
    assert built.composition["kinds"] == kinds
    assert json.loads((out / COMPOSITION_FILE).read_text()) == built.composition


@pytest.mark.parametrize("count, copy_share, junk_share", [(700, 0.5, 0.1), (999, 0.0, 0.0), (1001, 0.123, 0.0)])
def test_other_shares(tmp_path, count, copy_share, junk_share):
    built = write_web_like_shards(str(tmp_path), count=count, shard_size=300, copy_share=copy_share,
                                  junk_share=junk_share, imbalance=10)
    kinds = built.composition["kinds"]
    assert abs(kinds[KIND_COPY] - count * copy_share) <= 0.5 and abs(kinds[KIND_JUNK] - count * junk_share) <= 0.5
    assert sum(kinds.values()) == count
    assert built.composition["popular_sources"] == (0 if copy_share == 0 else round(kinds[KIND_COPY] ** 0.5))


@pytest.mark.parametrize("imbalance", [1.0, 10.0, 20.0, 100.0])
def test_class_sizes_follow_the_imbalance(tmp_path, imbalance):
    n_orig = 1500
    built = write_web_like_shards(str(tmp_path), count=n_orig, shard_size=500, seed=1, imbalance=imbalance,
                                  copy_share=0.0, junk_share=0.0)
    sizes = sorted(built.composition["originals_per_class"].values(), reverse=True)
    assert sum(sizes) == n_orig and min(sizes) >= 1
    expected = n_orig * imbalance ** (-np.arange(10) / 9) / (imbalance ** (-np.arange(10) / 9)).sum()
    assert np.abs(np.array(sizes) - expected).max() <= 1  # the exponential profile, to rounding
    assert sizes[0] / sizes[-1] == pytest.approx(imbalance, rel=0.1)
    assert built.composition["largest_over_smallest_class"] == sizes[0] / sizes[-1]


def test_originals_are_distinct_train_images_with_their_labels(samples):
    images, labels = load_fashion_mnist("train")
    originals = of_kind(samples, KIND_ORIGINAL)
    indices = [m["index"] for _, m, _ in originals]
    assert len(set(indices)) == len(indices)  # drawn without replacement
    for _, meta, jpg in originals:
        assert meta["label"] == labels[meta["index"]] and meta["label_name"] == CLASS_NAMES[meta["label"]]
        assert meta["copy_of"] is None and meta["split"] == "train"
        assert np.abs(pixels_of(jpg) - images[meta["index"]]).mean() < 2  # the real image, JPEG q95
    per_class = np.bincount([m["label"] for _, m, _ in originals], minlength=10)
    assert sorted(per_class.tolist(), reverse=True)[0] / min(per_class) == pytest.approx(20, rel=0.1)


def test_every_copy_names_an_original_with_its_label(pool, samples):
    originals = {k: m for k, m, _ in of_kind(samples, KIND_ORIGINAL)}
    copies = of_kind(samples, KIND_COPY)
    per_source = {}
    for _, meta, _ in copies:
        source = originals[meta["copy_of"]]  # an original in the pool
        assert (meta["label"], meta["label_name"], meta["index"]) == (
            source["label"], source["label_name"], source["index"])
        per_source[meta["copy_of"]] = per_source.get(meta["copy_of"], 0) + 1
    composition = pool[1].composition
    assert per_source == composition["copies_per_source"]
    assert len(per_source) == composition["popular_sources"] == round(len(copies) ** 0.5)
    counts = sorted(per_source.values(), reverse=True)
    assert counts[0] == composition["max_copies_of_one_source"]
    assert counts[0] >= 3 * np.median(counts) and counts[-1] >= 1  # heavy-tailed


def test_copies_are_visibly_altered_but_close(samples):
    originals = {k: (m, pixels_of(jpg)) for k, m, jpg in of_kind(samples, KIND_ORIGINAL)}
    by_label = {}
    for meta, pixels in originals.values():
        by_label.setdefault(meta["label"], []).append(pixels)
    source_corr, closer_than_classmates, tables = [], [], set()
    raw = {k: jpg for k, _, jpg in of_kind(samples, KIND_ORIGINAL)}
    for _, meta, jpg in of_kind(samples, KIND_COPY):
        assert jpg != raw[meta["copy_of"]]
        copy = pixels_of(jpg)
        _, source = originals[meta["copy_of"]]
        source_corr.append(correlation(copy, source))
        classmates = [correlation(copy, p) for p in by_label[meta["label"]] if p is not source]
        closer_than_classmates.append(source_corr[-1] > np.median(classmates))
        with Image.open(io.BytesIO(jpg)) as im:
            tables.add(tuple(im.quantization[0]))
    assert max(source_corr) < 0.99  # every copy is altered
    assert np.median(source_corr) > 0.6
    # ... but still its source's near-copy: closer than a typical image of its class, even in
    # pixels, where a crop or a one-pixel shift costs a 28-pixel image much of its correlation
    assert np.mean(closer_than_classmates) > 0.8
    assert len(tables) > 20  # re-encoded at many JPEG qualities


def test_junk_is_off_distribution(samples):
    junk = of_kind(samples, KIND_JUNK)
    assert len(junk) == 36
    for _, meta, _ in junk:
        assert (meta["label"], meta["label_name"], meta["copy_of"], meta["index"]) == (
            JUNK_LABEL, JUNK_LABEL_NAME, None, None)
    patterns = {m["url"].split("/")[-2] for _, m, _ in junk}
    assert patterns == set(JUNK_PATTERNS)
    assert max(dark_share(pixels_of(jpg)) for _, _, jpg in junk) < 0.2
    originals = [dark_share(pixels_of(jpg)) for _, _, jpg in of_kind(samples, KIND_ORIGINAL)]
    assert np.mean(np.array(originals) >= 0.2) > 0.95


def test_members_are_adjacent_and_families_apart(pool, samples):
    for shard, tar in enumerate(pool[1].tars):
        names = [name for name, _ in read_tar(tar)]
        assert len(names) == 3 * SHARD_SIZE
        for i in range(SHARD_SIZE):
            key = f"{shard:05d}{i:04d}"
            assert names[3 * i : 3 * i + 3] == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
        kinds = {json.loads(data)["kind"] for name, data in read_tar(tar) if name.endswith(".json")}
        assert kinds == set(KINDS)  # shuffled across shards
    family = [m["index"] for _, m, _ in samples]  # an original and its copies share it
    assert not [i for i in range(1, len(family)) if family[i] is not None and family[i] == family[i - 1]]
    top = max(pool[1].composition["copies_per_source"].items(), key=lambda kv: kv[1])[0]
    assert {k[:5] for k, m, _ in samples if m["copy_of"] == top} == {"00000", "00001", "00002"}


def test_webdataset_and_the_project_reader_read_it(pool, samples):
    tars = pool[1].tars
    read = list(wds.WebDataset(tars, shardshuffle=False))
    assert [s["__key__"] for s in read] == [k for k, _, _ in samples]
    for s in read:
        assert json.loads(s["json"])["key"] == s["__key__"] and s["__key__"][:5] == schema.shard_id_of(s["__url__"])
    ours = [s for tar in tars for s in read_shard(tar, EXTS).samples]
    assert [s.key for s in ours] == [k for k, _, _ in samples]
    assert {s.status for s in ours} == {schema.STATUS_OK}
    assert all(s.member(EXTS)[1] == jpg for s, (_, _, jpg) in zip(ours, samples))


def test_parquet_and_stats_match_the_json(pool, samples):
    out, built = pool
    metas = {k: m for k, m, _ in samples}
    for tar in built.tars:
        stem = tar[: -len(".tar")]
        table = pq.read_table(stem + ".parquet")
        assert {"kind", "copy_of", "label", "label_name", "index", "sha256"} <= set(table.column_names)
        for row in table.to_pylist():
            meta = metas[row["key"]]
            assert {c: row[c] for c in ("kind", "copy_of", "label", "label_name", "index", "url")} == {
                c: meta[c] for c in ("kind", "copy_of", "label", "label_name", "index", "url")}
        stats = json.loads(Path(stem + schema.STATS_SUFFIX).read_text())
        assert stats["count"] == stats["successes"] == table.num_rows == SHARD_SIZE


def test_layout_composition_is_not_a_shard(pool):
    out, built = pool
    assert [os.path.basename(t) for t in built.tars] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(glob.glob(str(out / "*.tar"))) == built.tars
    expected = {f"0000{i}{ext}" for i in range(3) for ext in (".tar", ".parquet", schema.STATS_SUFFIX)}
    assert set(os.listdir(out)) == expected | {COMPOSITION_FILE}  # no temporary files left behind
    assert built.composition["shards"] == ["00000.tar", "00001.tar", "00002.tar"]


def test_same_arguments_give_identical_tars(pool, tmp_path):
    again = write_web_like_shards(str(tmp_path / "a"), count=COUNT, shard_size=SHARD_SIZE, seed=SEED)
    for a, b in zip(pool[1].tars, again.tars):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert again.composition == pool[1].composition
    other = write_web_like_shards(str(tmp_path / "b"), count=COUNT, shard_size=SHARD_SIZE, seed=SEED + 1)
    assert Path(other.tars[0]).read_bytes() != Path(again.tars[0]).read_bytes()


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"count": 0}, "count"),
        ({"count": 60_000}, "count=60000 with imbalance=20.0 needs .* originals of class"),
        ({"count": 12, "imbalance": 100}, "smallest class would be empty"),
        ({"shard_size": 0}, "shard_size"),
        ({"imbalance": 0.5}, "imbalance"),
        ({"copy_share": 1.0}, r"copy_share must be in \[0, 1\)"),
        ({"junk_share": -0.1}, r"junk_share must be in \[0, 1\)"),
        ({"copy_share": 0.6, "junk_share": 0.4}, r"copy_share \+ junk_share must be < 1"),
        ({"popular": 1000}, "popular"),
        ({"copy_exponent": -1}, "copy_exponent"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, named):
    with pytest.raises(ValueError, match=named):
        write_web_like_shards(str(tmp_path / "out"), **({"count": 600} | kwargs))
    assert not (tmp_path / "out").exists()  # checked before anything is written


def _cli(args, tmp_path):
    env = subprocess_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "demo-data", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_a_web_like_pool(tmp_path):
    out = tmp_path / "pool"
    res = _cli([str(out), "--web-like", "--count", "600", "--shard-size", "200"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1 and "402 original, 180 copy, 18 junk" in res.stdout
    assert sorted(os.listdir(out)) == sorted(
        [f"0000{i}{ext}" for i in range(3) for ext in (".tar", ".parquet", schema.STATS_SUFFIX)] + [COMPOSITION_FILE])
    assert json.loads((out / COMPOSITION_FILE).read_text())["kinds"] == {"original": 402, "copy": 180, "junk": 18}


def test_cli_bad_option_is_one_line_and_exit_2(tmp_path):
    res = _cli([str(tmp_path / "pool"), "--web-like", "--copy-share", "1.5"], tmp_path)
    assert res.returncode == 2
    assert res.stderr == "ssl-prune: error: copy_share must be in [0, 1), got 1.5\n"
    assert not (tmp_path / "pool").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--junk-share", "0.1"], "--junk-share applies only with --web-like"),
        (["--web-like", "--split", "test"], "--web-like builds from the train split"),
        (["--web-like", "--start", "10"], "drop --split and --start"),
        (["--web-like", "--imbalance", "0.5"], "imbalance (largest class / smallest class) must be >= 1"),
        (["--web-like", "--count", "60000"], "needs"),
    ],
)
def test_cli_options_the_user_must_fix(tmp_path, capsys, args, named):
    """The same path as the command, in-process (each subprocess costs seconds of imports)."""
    assert main(["demo-data", str(tmp_path / "pool"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and err.startswith("ssl-prune: error: ")
    assert not (tmp_path / "pool").exists()
