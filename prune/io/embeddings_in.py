"""Precomputed embeddings in: what users already computed, read as the embed stage's output.

Two layouts, the ones users have:
- `parquet`: Parquet files with a key column and an embedding column (a list or fixed-size list
  of floats): NeMo Curator's embeddings, or our own `embeddings/`;
- `clip_retrieval`: clip-retrieval's inference output, `img_emb/img_emb_N.npy` with the rows of
  `metadata/metadata_N.parquet` beside it (same order).

The captions' embeddings come along where the layout has them (clip-retrieval's
`text_emb/text_emb_N.npy`, or the Parquet's `text_embedding_col`), and the embeddings written then
carry `text_embedding` and `clip_score` as the embed stage's do with `embed.text`.

Each file (part) becomes one unit of work, named like a shard (`00003` for img_emb_3.npy, or the
file's rank among the Parquet files), so the stages after embed run unchanged.
"""

from __future__ import annotations

import posixpath
import re
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prune import schema
from prune.io.storage import InputError, _unstrip, split_url
from prune.settings import NonEmptyStr, Section

FORMAT_PARQUET, FORMAT_CLIP_RETRIEVAL = "parquet", "clip_retrieval"
_NPY = re.compile(r"img_emb_(\d+)\.npy$")


class ImportConfig(Section):
    """The `import_embeddings` section: where the embeddings are and how to read them."""

    path: Optional[NonEmptyStr] = None  # a directory (local or any fsspec URL) with the layout below
    # parquet: files with key_col and embedding_col; clip_retrieval: its img_emb/img_emb_N.npy with
    # metadata/metadata_N.parquet (and text_emb/ when present)
    format: Literal["parquet", "clip_retrieval"] = FORMAT_PARQUET
    key_col: NonEmptyStr = schema.KEY  # identifies a sample (clip-retrieval: a metadata column)
    embedding_col: NonEmptyStr = schema.EMBEDDING  # parquet format only
    text_embedding_col: NonEmptyStr = schema.TEXT_EMBEDDING  # parquet format only, used when present
    # columns carried to export/ (for img2dataset re-downloads and DataComp ids) when present
    columns: list[str] = ["url", "caption", "uid"]


def list_parts(cfg: ImportConfig) -> dict[str, str]:
    """shard id -> URL of each embeddings file, in a stable order; an empty layout is an error."""
    fs, root = split_url(cfg.path)
    if cfg.format == FORMAT_CLIP_RETRIEVAL:
        found = {}
        for path in fs.glob(posixpath.join(root, "img_emb", "img_emb_*.npy")):
            m = _NPY.search(path)
            if m:
                found[f"{int(m.group(1)):05d}"] = _unstrip(fs, path)
    else:
        paths = sorted(p for p in fs.glob(posixpath.join(root, "*.parquet")) if not posixpath.basename(p).startswith("_"))
        found = {f"{i:05d}": _unstrip(fs, p) for i, p in enumerate(paths)}
    if not found:
        layout = "img_emb/img_emb_N.npy" if cfg.format == FORMAT_CLIP_RETRIEVAL else "*.parquet"
        raise InputError(f"import_embeddings.path {cfg.path}: no {layout} there (format {cfg.format})")
    return dict(sorted(found.items()))


def _metadata_url(npy_url: str) -> str:
    """clip-retrieval's metadata of an embeddings part: ../metadata/metadata_N.parquet."""
    root, name = posixpath.split(posixpath.dirname(npy_url))[0], posixpath.basename(npy_url)
    return posixpath.join(root, "metadata", "metadata_" + _NPY.search(name).group(1) + ".parquet")


def _text_url(npy_url: str) -> str:
    """clip-retrieval's caption embeddings of an embeddings part: ../text_emb/text_emb_N.npy."""
    root, name = posixpath.split(posixpath.dirname(npy_url))[0], posixpath.basename(npy_url)
    return posixpath.join(root, "text_emb", "text_emb_" + _NPY.search(name).group(1) + ".npy")


def _read_parquet(url: str, columns: Optional[list] = None) -> pa.Table:
    fs, path = split_url(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _matrix(col: pa.Array) -> np.ndarray:
    """A list column -> float32 [n, d]; a null row (a sample that failed upstream) becomes NaN."""
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)
    if not valid.any():
        return np.full((len(col), 0), np.nan, np.float32)
    first = int(np.argmax(valid))
    dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else len(col[first])
    out = np.full((len(col), dim), np.nan, np.float32)
    present = col.filter(pa.array(valid))
    out[valid] = present.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(present), dim)
    return out


def read_part(cfg: ImportConfig, url: str) -> tuple[list, np.ndarray, pa.Table, Optional[np.ndarray]]:
    """One part -> (keys, float32 [n, d] vectors as stored, carried metadata columns, the captions'
    float32 [n, t] vectors as stored or None where the layout has none)."""
    text = None
    if cfg.format == FORMAT_CLIP_RETRIEVAL:
        fs, path = split_url(url)
        with fs.open(path, "rb") as f:
            vectors = np.load(f)
        meta = _read_parquet(_metadata_url(url))
        if len(meta) != len(vectors):
            raise ValueError(f"{url}: {len(vectors)} embeddings but {len(meta)} metadata rows")
        text_fs, text_path = split_url(_text_url(url))
        if text_fs.exists(text_path):
            with text_fs.open(text_path, "rb") as f:
                text = np.asarray(np.load(f), dtype=np.float32)
            if len(text) != len(vectors):
                raise ValueError(f"{_text_url(url)}: {len(text)} caption embeddings but {len(vectors)} image embeddings")
    else:
        meta = _read_parquet(url)
        if cfg.embedding_col not in meta.column_names:
            raise ValueError(f"{url}: no column {cfg.embedding_col!r} (import_embeddings.embedding_col)")
        vectors = _matrix(meta.column(cfg.embedding_col).combine_chunks())
        if cfg.text_embedding_col in meta.column_names:
            text = _matrix(meta.column(cfg.text_embedding_col).combine_chunks())
    if cfg.key_col not in meta.column_names:
        raise ValueError(f"{url}: no key column {cfg.key_col!r} (import_embeddings.key_col)")
    keys = [str(k) for k in meta.column(cfg.key_col).to_pylist()]
    carried = meta.select([c for c in cfg.columns if c in meta.column_names and c != cfg.key_col])
    return keys, np.asarray(vectors, dtype=np.float32), carried, text


def with_scores(unit: np.ndarray, ok: np.ndarray, text: Optional[np.ndarray]):
    """(unit caption vectors, where there is one, each pair's cosine) from the captions' vectors as
    stored; None without them. A row with no direction (or a failed image) has no score."""
    if text is None or not text.size:
        return None
    if text.shape[1] != unit.shape[1]:
        raise ValueError(f"caption embeddings of dimension {text.shape[1]}, image embeddings of {unit.shape[1]}: "
                         "not one model's space")
    text_unit, text_ok = normalized(text)
    score = np.where(text_ok & ok, np.einsum("ij,ij->i", text_unit, unit), np.nan).astype(np.float32)
    return text_unit, text_ok, score


def probe_dim(cfg: ImportConfig, parts: dict[str, str]) -> int:
    """The embeddings' dimension, from file headers where they say it (npy, fixed-size lists),
    else from the first part with a row: every part is written with it, even one whose rows all
    failed upstream."""
    for url in parts.values():
        fs, path = split_url(url)
        with fs.open(path, "rb") as f:
            if cfg.format == FORMAT_CLIP_RETRIEVAL:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read_header(f)[0]
                if len(shape) == 2 and shape[1]:
                    return int(shape[1])
                continue
            found = pq.read_schema(f)
            field = found.field(cfg.embedding_col) if cfg.embedding_col in found.names else None
        if field is not None and pa.types.is_fixed_size_list(field.type):
            return field.type.list_size
        _, vectors, _, _ = read_part(cfg, url)
        if vectors.shape[1]:
            return vectors.shape[1]
    raise InputError(f"import_embeddings.path {cfg.path}: no embedding in any file")


def normalized(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit-norm rows, ok mask): a row with NaN/inf or zero norm has no direction to score."""
    norms = np.linalg.norm(vectors, axis=1) if vectors.size else np.zeros(len(vectors))
    ok = np.isfinite(vectors).all(axis=1) & np.isfinite(norms) & (norms > 0) if vectors.size else np.zeros(len(vectors), bool)
    out = np.zeros_like(vectors)
    out[ok] = vectors[ok] / norms[ok, None]
    return out, ok
