"""How good is an encoder? Cosine k-NN (k=20) and a linear probe, beside the same on raw pixels.

Reads labeled shards (each sample's `.json` has an integer `label`, as `ssl-prune demo-data`
writes them), decodes every image with the encoder's own preprocessing and embeds it in this
process; raw pixels are the same images decoded to their native size, grayscale, scaled to
[0, 1]. Prints a Markdown table (accuracy on the test shards).

    .venv/bin/python benchmarks/encoder_quality.py --encoder models/fmnist-simclr \\
        --train demo/fmnist/train --test demo/fmnist/test
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from prune import schema
from prune.embed.backends import make_embedder
from prune.embed.decode import PreprocessSpec, decode_image
from prune.embed.settings import EmbedConfig
from prune.evaluate import LABEL_MEMBER, parse_label
from prune.evaluate.probes import accuracy, knn_predict, linear_probe
from prune.io.shards import read_shard
from prune.io.storage import list_input_shards


def load(spec_in: str, embed_spec: PreprocessSpec, raw_size: int):
    """-> (crops for the encoder, raw grayscale pixels, labels) of every decodable, labeled sample."""
    crops, raw, labels = [], [], []
    raw_spec = PreprocessSpec(size=raw_size, resize_mode="squash")
    for url in list_input_shards(spec_in):
        for s in read_shard(url, list(schema.IMAGE_EXTENSIONS_DEFAULT)).samples:
            image, meta = s.member(schema.IMAGE_EXTENSIONS_DEFAULT), s.member([LABEL_MEMBER])
            label, _why = parse_label(meta[1] if meta else None, "label")
            if s.status != schema.STATUS_OK or not image or label is None:
                continue
            crop, ok = decode_image(image[1], embed_spec)
            pixels, ok2 = decode_image(image[1], raw_spec)
            if ok != schema.STATUS_OK or ok2 != schema.STATUS_OK:
                continue
            crops.append(crop)
            raw.append(pixels[..., 0].reshape(-1).astype(np.float32) / 255.0)
            labels.append(label)
    return np.stack(crops), np.stack(raw), np.array(labels)


def embed_all(embedder, crops: np.ndarray, batch: int = 512) -> np.ndarray:
    return np.concatenate([embedder.embed(crops[i : i + batch]) for i in range(0, len(crops), batch)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="models/fmnist-simclr")
    p.add_argument("--train", default="demo/fmnist/train")
    p.add_argument("--test", default="demo/fmnist/test")
    p.add_argument("--raw-size", type=int, default=28)
    p.add_argument("--k", type=int, default=20)
    args = p.parse_args()

    t0 = time.time()
    embedder = make_embedder(EmbedConfig(backend="local", pretrained=args.encoder, precision="fp32"))
    tr_crops, tr_raw, tr_y = load(args.train, embedder.preprocess, args.raw_size)
    te_crops, te_raw, te_y = load(args.test, embedder.preprocess, args.raw_size)
    tr_f, te_f = embed_all(embedder, tr_crops), embed_all(embedder, te_crops)
    rows = []
    for name, tr, te in (("raw pixels", tr_raw, te_raw), (f"encoder {embedder.model_id}", tr_f, te_f)):
        knn = accuracy(knn_predict(tr, tr_y, te, args.k), te_y)
        lin = accuracy(linear_probe(tr, tr_y, te), te_y)
        rows.append((name, tr.shape[1], knn, lin))
    print(f"\n{len(tr_y)} train / {len(te_y)} test samples, {time.time() - t0:.0f} s\n")
    print(f"| features | dim | k-NN (cosine, k={args.k}) | linear probe |")
    print("| --- | ---: | ---: | ---: |")
    for name, dim, knn, lin in rows:
        print(f"| {name} | {dim} | {knn:.2%} | {lin:.2%} |")


if __name__ == "__main__":
    main()
