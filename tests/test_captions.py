"""Captions in, alignment out: the embed stage reads each sample's caption (.txt, else the parquet),
runs the text tower in the same actor pass, and records the text embedding and the clip score."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import run
from pipelines.cli.config import validate_config
from pipelines.decoding import captions_of
from prune import schema
from prune.demo.shards import write_demo_shards
from prune.embed.text import MAX_CAPTION_CHARS
from prune.io.shards import read_shard
from prune.settings import ConfigError

from .conftest import small_config

SEED = 3


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory):
    """Two demo shards, and a third whose captions are of every awkward kind: from the parquet only,
    missing everywhere, empty, not UTF-8, huge."""
    d = tmp_path_factory.mktemp("captions") / "shards"
    paths = write_demo_shards(str(d), count=80, shard_size=40, seed=SEED)
    with tarfile.open(paths[0]) as src:
        jpgs = [src.extractfile(m).read() for m in src.getmembers() if m.name.endswith(".jpg")][:6]
    huge = ("a very long caption " * 2000).encode()
    kinds = {"000020000": None, "000020001": None, "000020002": b"", "000020003": b"\xff\xfe not utf-8",
             "000020004": huge, "000020005": b"  a photo of a shirt  "}
    with tarfile.open(d / "00002.tar", "w") as tar:
        for (key, txt), jpg in zip(kinds.items(), jpgs):
            _add(tar, f"{key}.jpg", jpg)
            if txt is not None:
                _add(tar, f"{key}.txt", txt)
    # the parquet beside it names a caption for the first sample only (the .txt of others wins)
    pq.write_table(pa.table({"key": ["000020000", "000020004"], "caption": ["from the parquet", "not this one"]}),
                   d / "00002.parquet")
    return {"dir": d, "huge": huge.decode()}


def test_captions_come_from_the_txt_member_else_the_parquet(caption_shards):
    url = str(caption_shards["dir"] / "00002.tar")
    found = captions_of(read_shard(url, ["jpg"]).samples, url, "caption")
    assert found == ["from the parquet", None, None, None, caption_shards["huge"][:MAX_CAPTION_CHARS].strip(),
                     "a photo of a shirt"]
    assert captions_of(read_shard(url, ["jpg"]).samples, url, "no_such_column")[:2] == [None, None]


def _config(shards, out, **over):
    return validate_config(small_config(shards, out, **({
        "stages": ["embed"], "embed.model": "ViT-S-32", "embed.text": True, "embed.precision": "fp32",
        "embed.seed": SEED} | over)))


def test_text_embeddings_and_scores_are_open_clips_own(ray_cluster, caption_shards, tmp_path):
    import open_clip
    import torch

    manifest = run(_config(caption_shards["dir"], tmp_path / "out"))
    tables = {p.stem: pq.read_table(p) for p in sorted((tmp_path / "out" / "embeddings").glob("*.parquet"))}
    assert all(t.schema.field(schema.CLIP_SCORE).type == pa.float32() for t in tables.values())
    # the reference: open_clip's own model, same seed, encode_text at the full context, normalized
    torch.manual_seed(SEED)
    model = open_clip.create_model("ViT-S-32").eval()
    tokenizer = open_clip.get_tokenizer("ViT-S-32")
    captions = {}
    for shard in ("00000", "00001"):
        with tarfile.open(caption_shards["dir"] / f"{shard}.tar") as tar:
            captions |= {m.name[:-4]: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    captions |= {"000020000": "from the parquet", "000020004": caption_shards["huge"], "000020005": "a photo of a shirt"}
    rows = [r for t in tables.values() for r in t.to_pylist()]
    with_text = [r for r in rows if r[schema.CLIP_SCORE] is not None]
    assert {r[schema.KEY] for r in with_text} == set(captions)  # no caption: null, never a failure
    assert all(r[schema.STATUS] == "ok" and r[schema.TEXT_EMBEDDING] is None for r in rows if r[schema.KEY] not in captions)
    with torch.no_grad():
        ref = model.encode_text(tokenizer([captions[r[schema.KEY]] for r in with_text]), normalize=True).numpy()
    text = np.array([r[schema.TEXT_EMBEDDING] for r in with_text], np.float32)
    image = np.array([r[schema.EMBEDDING] for r in with_text], np.float32)
    np.testing.assert_allclose(text, ref, atol=2e-3)  # float16 storage
    score = np.array([r[schema.CLIP_SCORE] for r in with_text], np.float32)
    np.testing.assert_allclose(score, np.einsum("ij,ij->i", image, ref), atol=3e-3)
    assert manifest["stages"]["embed"]["without_caption"] == 3  # missing, empty, not UTF-8


def test_a_backend_without_a_text_tower_is_refused_naming_the_key(caption_shards, tmp_path):
    cfg = _config(caption_shards["dir"], tmp_path / "out", **{"embed.backend": "timm", "embed.model": "resnet18"})
    with pytest.raises(ConfigError, match=r"embed\.text: embed\.backend=timm has no text tower.*open_clip"):
        run(cfg)


def test_embed_text_changes_the_embed_fingerprint_only_when_on(tmp_path):
    from pipelines.executor import stage_fingerprint
    from pipelines.stage import Context
    from prune.io.storage import OutputDir

    def fp(**over):
        stage = validate_config(small_config(tmp_path, tmp_path, **over)).stage_list()[0]
        return stage_fingerprint(stage, [], Context(OutputDir(str(tmp_path)), {}))

    assert fp() == fp(**{"embed.caption_column": "text"})  # read only with embed.text
    assert fp(**{"embed.text": True}) != fp() and fp(**{"embed.text": True}) != fp(**{"embed.text": True, "embed.caption_column": "x"})


CURATED = ["embed", "prototypes", "assign", "clip_score", "select", "write", "export"]


def _scores(out) -> list[dict]:
    return [r for p in sorted((out / "scores").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def _clip_scores(out) -> dict:
    return {r[schema.KEY]: r[schema.CLIP_SCORE] for p in sorted((out / "embeddings").glob("*.parquet"))
            for r in pq.read_table(p, columns=[schema.KEY, schema.CLIP_SCORE]).to_pylist()}


def test_the_clip_score_stage_removes_exactly_the_rule_s_pairs(ray_cluster, caption_shards, tmp_path):
    out = tmp_path / "out"
    base = {"stages": CURATED, "kmeans.k": 3, "select.keep_fraction": 1.0, "select.policy": "random"}
    top = run(_config(caption_shards["dir"], out, **base, **{"clip_score.keep_top_fraction": 0.3}))
    scored = {k: s for k, s in _clip_scores(out).items() if s is not None}
    # the top 30% of the scored pairs by score, exactly (the cut is the 0.3 x n-th largest score)
    n_keep = int(np.floor(0.3 * len(scored) + 0.5))
    best = sorted(scored, key=lambda k: -scored[k])[:n_keep]
    rows = _scores(out)
    low = {r[schema.KEY] for r in rows if r[schema.STATUS] == schema.STATUS_LOW_ALIGNMENT}
    assert low == set(scored) - set(best)
    assert top["stages"]["clip_score"]["cut"] == pytest.approx(min(scored[k] for k in best))
    c = top["counts"]
    assert c["removed_by_reason"] == {schema.STATUS_LOW_ALIGNMENT: len(low)}
    assert c["kept"] == len(best) + 3  # keep_fraction 1.0: every survivor, the 3 without a caption too
    assert c["input_samples"] == c["kept"] + c["pruned"] + c["removed"] + c["failed"]
    exported = pq.read_table(out / schema.EXPORT_IDS_DIR).to_pylist()  # the kept ids, each with its score
    assert {r[schema.KEY] for r in exported} == {r[schema.KEY] for r in rows if r[schema.KEEP]}
    assert all(r[schema.CLIP_SCORE] == pytest.approx(scored[r[schema.KEY]]) for r in exported if r[schema.KEY] in scored)

    # a threshold, and captionless pairs removed: the embeddings are reused, only curation onwards runs
    floor = float(np.median(list(scored.values())))
    again = run(_config(caption_shards["dir"], out, **base, **{"clip_score.keep_top_fraction": None,
                                                               "clip_score.min_score": floor,
                                                               "clip_score.missing": "remove"}))
    assert again["stages"]["embed"]["reused"] and not again["stages"]["clip_score"]["reused"]
    statuses = {r[schema.KEY]: r[schema.STATUS] for r in _scores(out)}
    assert {k for k, s in statuses.items() if s == schema.STATUS_LOW_ALIGNMENT} == {k for k, s in scored.items() if s < floor}
    assert {k for k, s in statuses.items() if s == schema.STATUS_NO_CAPTION} == {"000020001", "000020002", "000020003"}
    _the_report_shows_the_lowest_pairs_with_their_captions(out, scored, tmp_path)


def _the_report_shows_the_lowest_pairs_with_their_captions(out, scored: dict, tmp_path) -> None:
    """As a person sees it: rendered in headless Chromium, every image loaded, the agreement plot
    and the lowest pairs with their captions on the page, a screenshot that is not blank."""
    import html
    import re

    from PIL import Image

    from .test_report import _chromium

    page = out / "report.html"
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri()).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert re.search(r'data-broken-images="0"', body), body
    assert 'alt="alignment"' in dom and "Lowest caption-image agreement" in dom
    lowest = sorted(scored, key=lambda k: scored[k])[0]
    assert f"<b>{scored[lowest]:.3f}</b>" in dom and "low alignment" in dom
    pairs = dom[dom.index("Lowest caption-image agreement"):]
    assert html.escape("a photo of") in pairs  # the captions are on the page beside their images
    shot = tmp_path / "report_captions.png"
    _chromium("--window-size=1280,3200", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    print(f"screenshot of the report: {shot}")
    assert (pixels < 128).mean() > 0.03


def test_the_clip_score_stage_needs_the_scores(caption_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"embed\.text.*clip_score stage reads the captions' scores"):
        _config(caption_shards["dir"], tmp_path / "out", stages=CURATED, **{"embed.text": False})
    with pytest.raises(ConfigError, match=r"clip_score removes nothing"):
        _config(caption_shards["dir"], tmp_path / "out", **{"clip_score.keep_top_fraction": None})
