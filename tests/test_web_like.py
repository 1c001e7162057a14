"""The web-like pool is what it claims: long-tailed classes, altered near-copies of popular
originals that are themselves in the pool, off-distribution junk, web-like captions (most
describe the image, some name another class, some say nothing), in img2dataset's layout."""

import glob
import io
import json
import os
import re
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
from prune.demo import captions as cap
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
from prune.embed.text import MAX_CAPTION_CHARS
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
        columns = ("kind", "copy_of", "label", "label_name", "index", "url", "uid", "caption", "caption_kind",
                   "caption_label", "caption_copied")
        assert set(columns) <= set(table.column_names)
        for row in table.to_pylist():
            meta = metas[row["key"]]
            assert {c: row[c] for c in columns} == {c: meta[c] for c in columns}
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
        ({"caption_mix": {"wrong": 1.5}}, r"caption_mix: the wrong share must be a number in \[0, 1\], got 1.5"),
        ({"caption_mix": {"spam": -0.1}}, r"caption_mix: the spam share must be a number in \[0, 1\]"),
        ({"caption_mix": {"wrong": 0.6, "spam": 0.5}}, r"caption_mix: the shares wrong \+ spam sum to 1.1, more than 1"),
        ({"caption_mix": {"describes": 0.9, "wrong": 0.2}}, "caption_mix: the describes share is the rest, 0.8"),
        ({"caption_mix": {"junk": 0.1}}, "caption_mix: unknown caption kind 'junk'"),
        ({"copy_same_caption": 1.5}, r"copy_same_caption must be in \[0, 1\]"),
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
    # 582 originals and copies at the default mix (407.4, 69.8, 58.2, 23.3, 23.3 to rounding), the 18 junk
    # at its say-nothing part (10, 4, 4)
    assert "captions: 408 describes, 70 wrong, 68 noise, 27 empty, 27 spam" in res.stdout
    assert sorted(os.listdir(out)) == sorted(
        [f"0000{i}{ext}" for i in range(3) for ext in (".tar", ".parquet", schema.STATS_SUFFIX)] + [COMPOSITION_FILE])
    composition = json.loads((out / COMPOSITION_FILE).read_text())
    assert composition["kinds"] == {"original": 402, "copy": 180, "junk": 18}
    assert composition["caption_mix"] == cap.DEFAULT_CAPTION_MIX


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
        (["--caption-mix", "wrong=0.1"], "--caption-mix applies only with --web-like"),
        (["--web-like", "--caption-mix", "wrong=1.5"], "--caption-mix: the wrong share must be a number in [0, 1], got 1.5"),
        (["--web-like", "--caption-mix", "wrong=0.7,noise=0.4"], "--caption-mix: the shares wrong + noise sum to 1.1"),
        (["--web-like", "--caption-mix", "wrong=abc"], "--caption-mix: the wrong share must be a number in [0, 1], got 'abc'"),
        (["--web-like", "--caption-mix", "wrong"], "--caption-mix: expected KIND=SHARE pairs"),
        (["--web-like", "--caption-mix", "typo=0.1"], "--caption-mix: unknown caption kind 'typo'"),
    ],
)
def test_cli_options_the_user_must_fix(tmp_path, capsys, args, named):
    """The same path as the command, in-process (each subprocess costs seconds of imports)."""
    assert main(["demo-data", str(tmp_path / "pool"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and err.startswith("ssl-prune: error: ")
    assert not (tmp_path / "pool").exists()


# -- captions ---------------------------------------------------------------------------------------

def classes_named(text: str) -> set[int]:
    """The classes whose nouns occur in `text` as whole words ("-" part of a word: a t-shirt is no shirt)."""
    return {label for label, name in enumerate(CLASS_NAMES) for noun in cap.CLASS_NOUNS[name]
            if re.search(rf"(?<![\w-]){re.escape(noun)}(?![\w-])", text, re.IGNORECASE)}


@pytest.fixture(scope="module")
def captioned(pool):
    """[(meta, .txt bytes, parquet row)] over all shards, in pool order."""
    out = []
    for tar in pool[1].tars:
        members = dict(read_tar(tar))
        rows = {r["key"]: r for r in pq.read_table(tar[: -len(".tar")] + ".parquet").to_pylist()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                out.append((json.loads(data), members[f"{key}.txt"], rows[key]))
    return out


def caption_counts(metas, kinds=(KIND_ORIGINAL, KIND_COPY, KIND_JUNK)) -> dict:
    return {k: sum(m["caption_kind"] == k and m["kind"] in kinds for m in metas) for k in cap.CAPTION_KINDS}


def assert_counts_follow(counts: dict, shares: dict, n: int) -> None:
    assert sum(counts.values()) == n
    for kind, share in shares.items():
        assert abs(counts.get(kind, 0) - n * share) < 1, (kind, counts, shares)


def test_caption_kinds_match_the_mix(pool, captioned):
    metas = [m for m, _, _ in captioned]
    garment = caption_counts(metas, (KIND_ORIGINAL, KIND_COPY))
    assert_counts_follow(garment, cap.DEFAULT_CAPTION_MIX, COUNT - 36)
    junk = caption_counts(metas, (KIND_JUNK,))
    say = {k: cap.DEFAULT_CAPTION_MIX[k] for k in cap.SAYS_NOTHING}
    assert_counts_follow(junk, {k: v / sum(say.values()) for k, v in say.items()} | {cap.DESCRIBES: 0, cap.WRONG: 0}, 36)
    composition = pool[1].composition
    assert composition["caption_mix"] == cap.DEFAULT_CAPTION_MIX
    assert composition["caption_kinds"] == caption_counts(metas)
    assert composition["caption_kinds_per_kind"] == {kind: caption_counts(metas, (kind,)) for kind in KINDS}
    assert json.loads((pool[0] / COMPOSITION_FILE).read_text()) == composition


def test_txt_json_and_parquet_carry_the_same_caption(captioned):
    for meta, txt, row in captioned:
        assert txt == meta["caption"].encode() and row["caption"] == meta["caption"]
        assert (row["caption_kind"], row["caption_label"], row["caption_copied"]) == (
            meta["caption_kind"], meta["caption_label"], meta["caption_copied"])
        assert (txt == b"") == (meta["caption_kind"] == cap.EMPTY)  # an empty .txt member, as img2dataset writes


def test_describing_captions_name_the_class_and_wrong_ones_another(captioned):
    by_kind = {}
    for meta, _, _ in captioned:
        text, kind, label = meta["caption"], meta["caption_kind"], meta["caption_label"]
        by_kind.setdefault(kind, []).append(meta)
        if kind == cap.DESCRIBES:
            assert label == meta["label"] and classes_named(text) == {label}, text
        elif kind == cap.WRONG:
            assert label != meta["label"] and classes_named(text) == {label}, text
        else:
            assert label is None and classes_named(text) == set(), text
    describing = [m["caption"] for m in by_kind[cap.DESCRIBES]]
    assert len(set(describing)) > 0.7 * len(describing)  # varied templates, nouns and attributes
    nouns = {noun for text in describing for name in CLASS_NAMES for noun in cap.CLASS_NOUNS[name]
             if re.search(rf"(?<![\w-]){re.escape(noun)}(?![\w-])", text)}
    assert len(nouns) > 30  # synonyms, not only the class names
    assert sum(t.startswith("a photo of ") for t in describing) < 0.2 * len(describing)
    wrong = [m["caption_label"] for m in by_kind[cap.WRONG]]
    assert len(set(wrong)) == len(CLASS_NAMES)  # any other class


def test_tone_and_texture_words_are_the_pixels(captioned):
    """An original's own caption says what its pixels show: no "white" on a dark image."""
    images, _ = load_fashion_mnist("train")
    tone_words = {w: t for t, words in cap.TONE_WORDS.items() for w in words}
    texture_words = {w: t for t, words in cap.TEXTURE_WORDS.items() for w in words}
    seen = {}
    for meta, _, _ in captioned:
        if meta["kind"] != KIND_ORIGINAL or meta["caption_kind"] not in (cap.DESCRIBES, cap.WRONG):
            continue
        pixels = images[meta["index"]]
        words = re.findall(r"[a-z]+", meta["caption"].lower().replace("black background", ""))
        for w in words:
            if w in tone_words:
                assert tone_words[w] == cap.tone_of(pixels), meta["caption"]
                seen[tone_words[w]] = seen.get(tone_words[w], 0) + 1
            if w in texture_words:
                assert texture_words[w] == cap.texture_of(pixels), meta["caption"]
                seen[texture_words[w]] = seen.get(texture_words[w], 0) + 1
    assert set(seen) == {"dark", "grey", "light", "plain", "patterned"}


def test_tone_and_texture_of_pixels():
    flat = np.zeros((28, 28), np.uint8)
    flat[4:24, 6:22] = 200
    assert (cap.tone_of(flat), cap.texture_of(flat)) == ("light", "plain")
    assert cap.tone_of(np.where(flat, 150, 0)) == "grey" and cap.tone_of(np.where(flat, 60, 0)) == "dark"
    checks = flat.copy()
    checks[4:24, 6:22] = np.where((np.indices((20, 16)).sum(0) % 2) == 1, 250, 90)
    assert cap.texture_of(checks) == "patterned"
    strap = np.zeros((28, 28), np.uint8)
    strap[10:12, 2:26] = 220  # too thin to have an interior
    assert cap.texture_of(strap) is None and cap.tone_of(np.zeros((28, 28), np.uint8)) == "dark"


def test_captions_that_say_nothing(captioned):
    said = {}
    for meta, _, _ in captioned:
        said.setdefault(meta["caption_kind"], []).append(meta["caption"])
    assert set(said[cap.EMPTY]) == {""}
    assert all(cap.SPAM_WORDS_MIN <= len(t.split()) <= cap.SPAM_WORDS_MAX for t in said[cap.SPAM])  # hundreds of words
    assert all(0 < len(t.split()) <= 6 for t in said[cap.NOISE])
    file_names = [t for t in said[cap.NOISE] if re.search(r"\.(jpe?g|png|webp)$|^DSC|^Screenshot", t, re.IGNORECASE)]
    assert 0.2 < len(file_names) / len(said[cap.NOISE]) < 0.8  # file names and boilerplate
    assert {"free shipping", "click here", "buy now"} & set(said[cap.NOISE])


def test_copies_carry_their_original_caption_or_their_own(pool, captioned):
    originals = {m["key"]: m for m, _, _ in captioned if m["kind"] == KIND_ORIGINAL}
    copies = [m for m, _, _ in captioned if m["kind"] == KIND_COPY]
    carried = [m for m in copies if m["caption_copied"]]
    for m in carried:
        source = originals[m["copy_of"]]
        assert (m["caption"], m["caption_kind"], m["caption_label"]) == (
            source["caption"], source["caption_kind"], source["caption_label"])
    assert pool[1].composition["copies_with_original_caption"] == len(carried)
    assert 0.35 < len(carried) / len(copies) < 0.65  # copy_same_caption 0.5 (360 copies)
    own = [m for m in copies if not m["caption_copied"]]
    assert sum(m["caption"] != originals[m["copy_of"]]["caption"] for m in own) > 0.8 * len(own)
    assert not any(m["caption_copied"] for m, _, _ in captioned if m["kind"] != KIND_COPY)


def test_the_pipeline_reads_an_empty_caption_as_none(pool, captioned):
    from pipelines.decoding import captions_of

    metas = {m["key"]: m for m, _, _ in captioned}
    for tar in pool[1].tars:
        samples = read_shard(tar, EXTS).samples
        for s, caption in zip(samples, captions_of(samples, tar, "caption")):
            meta = metas[s.key]
            expected = None if meta["caption_kind"] == cap.EMPTY else meta["caption"][:MAX_CAPTION_CHARS]
            assert caption == expected


@pytest.mark.parametrize(
    "mix, same",
    [({}, 1.0), ({"wrong": 1.0}, 0.5), ({"noise": 0.2, "empty": 0.3, "spam": 0.5}, 0.0),
     ({"describes": 0.5, "wrong": 0.25, "spam": 0.25}, 1.0)],
)
def test_other_caption_mixes(tmp_path, mix, same):
    built = write_web_like_shards(str(tmp_path), count=400, shard_size=400, seed=2, caption_mix=mix,
                                  copy_same_caption=same)
    metas = [json.loads(d) for name, d in read_tar(built.tars[0]) if name.endswith(".json")]
    full = cap.caption_mix(mix)
    assert built.composition["caption_mix"] == full and sum(full.values()) == pytest.approx(1)
    assert_counts_follow(caption_counts(metas, (KIND_ORIGINAL, KIND_COPY)), full, 400 - 12)
    assert {m["caption_kind"] for m in metas if m["kind"] == KIND_JUNK} <= set(cap.SAYS_NOTHING)
    carried = sum(m["caption_copied"] for m in metas)
    if same == 0.0:
        assert carried == 0
    elif same == 1.0 and len({k for k, v in full.items() if v}) == 1:  # one kind: every copy carries
        assert carried == built.composition["kinds"][KIND_COPY] == 120
    elif same == 1.0:  # kinds traded with samples of no family: almost every copy carries
        assert carried >= 0.9 * 120
    else:
        assert 0.3 * 120 < carried < 0.7 * 120


def test_captions_leave_the_images_as_they_were(tmp_path):
    """Captions draw from their own generators: the caption settings change no image, no other field."""
    a = write_web_like_shards(str(tmp_path / "a"), count=300, shard_size=300, seed=4)
    b = write_web_like_shards(str(tmp_path / "b"), count=300, shard_size=300, seed=4,
                              caption_mix={"wrong": 0.5, "spam": 0.3}, copy_same_caption=0.0)
    ours = {"caption", "uid", "caption_kind", "caption_label", "caption_copied"}
    differ = 0
    for (na, da), (nb, db) in zip(read_tar(a.tars[0]), read_tar(b.tars[0])):
        assert na == nb
        if na.endswith(".jpg"):
            assert da == db
        elif na.endswith(".json"):
            ma, mb = json.loads(da), json.loads(db)
            assert {k: v for k, v in ma.items() if k not in ours} == {k: v for k, v in mb.items() if k not in ours}
            differ += ma["caption"] != mb["caption"]
    assert differ > 200
    assert {k: v for k, v in a.composition.items() if "caption" not in k} == {
        k: v for k, v in b.composition.items() if "caption" not in k}


def test_class_nouns_are_unambiguous():
    for label, name in enumerate(CLASS_NAMES):
        for noun in cap.CLASS_NOUNS[name]:
            assert classes_named(noun) == {label}, noun
    assert tuple(cap.CLASS_NOUNS) == CLASS_NAMES


def test_make_caption_is_a_function_of_its_arguments():
    images, labels = load_fashion_mnist("train")
    for kind in cap.CAPTION_KINDS:
        a = cap.make_caption(int(labels[0]), images[0], kind, np.random.default_rng(7))
        b = cap.make_caption(int(labels[0]), images[0], kind, np.random.default_rng(7))
        assert a == b and a.kind == kind
    with pytest.raises(ValueError, match="describing caption needs a class label"):
        cap.make_caption(JUNK_LABEL, images[0], cap.DESCRIBES, np.random.default_rng(0))
    with pytest.raises(ValueError, match="caption kind must be one of"):
        cap.make_caption(0, images[0], "junk", np.random.default_rng(0))


def test_parse_caption_mix():
    assert cap.parse_caption_mix(cap.format_mix(cap.DEFAULT_CAPTION_MIX)) == cap.DEFAULT_CAPTION_MIX
    assert cap.parse_caption_mix("") == {cap.DESCRIBES: 1.0, cap.WRONG: 0.0, cap.NOISE: 0.0, cap.EMPTY: 0.0,
                                         cap.SPAM: 0.0}
    assert cap.parse_caption_mix(" wrong=0.25 , spam=0.25 ")[cap.DESCRIBES] == 0.5
    assert cap.parse_caption_mix("describes=0.4,noise=0.6")[cap.NOISE] == 0.6
    assert cap.parse_caption_mix("wrong=1")[cap.DESCRIBES] == 0.0
    for bad, named in (("wrong=0.1,wrong=0.2", "wrong given twice"), ("=0.1", "KIND=SHARE"),
                       ("noise=inf", "noise share"), ("empty=nan", "empty share")):
        with pytest.raises(ValueError, match=named):
            cap.parse_caption_mix(bad)


def test_cli_caption_mix_reaches_the_pool(tmp_path, capsys):
    out = tmp_path / "pool"
    assert main(["demo-data", str(out), "--web-like", "--count", "300", "--shard-size", "300",
                 "--caption-mix", "wrong=0.5,empty=0.1"]) == 0
    # 291 originals and copies: 116.4, 145.5, 0, 29.1, 0 to rounding; the 9 junk say nothing: empty
    assert "captions: 116 describes, 146 wrong, 0 noise, 38 empty, 0 spam" in capsys.readouterr().out
    composition = json.loads((out / COMPOSITION_FILE).read_text())
    assert composition["caption_mix"] == {"describes": 0.4, "wrong": 0.5, "noise": 0.0, "empty": 0.1, "spam": 0.0}
