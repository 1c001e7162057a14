"""How good is an encoder? Cosine k-NN (k=20) and a linear probe, beside the same on raw pixels.

Reads labeled shards (each sample's `.json` has an integer `label`, as `ssl-prune demo-data`
writes them), decodes every image with the encoder's own preprocessing and embeds it in this
process; raw pixels are the same images decoded to their native size, grayscale, scaled to
[0, 1]. Prints a Markdown table (accuracy on the test shards).

    .venv/bin/python benchmarks/encoder_quality.py --encoder models/fmnist-simclr \\
        --train demo/fmnist/train --test demo/fmnist/test

`--curve OUT` scores every checkpoint a `train-encoder` run kept under OUT/ray_train/ (k-NN and,
with --probe, the linear probe) and prints accuracy against epochs: does longer training pay?
"""

from __future__ import annotations

import argparse
import glob
import json
import os
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


def checkpoints(run_dir: str) -> list[tuple[int, float, str]]:
    """(epoch, loss, directory) of every end-of-epoch checkpoint of a train-encoder output."""
    found = []
    for d in glob.glob(os.path.join(run_dir, "ray_train", "*", "checkpoint_*/")):
        with open(os.path.join(d, "train_state.json")) as f:
            state = json.load(f)
        if state.get("epoch_done") and state["history"]:
            found.append((state["epoch"] + 1, state["history"][-1]["loss"], d))
    return sorted(found)


def curve(args) -> None:
    first = [c for c in checkpoints(args.curve) if not args.epochs or c[0] in args.epochs]
    if not first:
        raise SystemExit(f"no end-of-epoch checkpoint under {args.curve}/ray_train/")
    spec = make_embedder(EmbedConfig(backend="local", pretrained=first[0][2], precision="fp32")).preprocess
    tr_crops, _, tr_y = load(args.train, spec, args.raw_size)
    te_crops, _, te_y = load(args.test, spec, args.raw_size)
    print(f"| epoch | loss | k-NN (cosine, k={args.k}) |" + (" linear probe |" if args.probe else ""))
    print("| ---: | ---: | ---: |" + (" ---: |" if args.probe else ""))
    for epoch, loss, d in first:
        embedder = make_embedder(EmbedConfig(backend="local", pretrained=d, precision="fp32"))
        tr_f, te_f = embed_all(embedder, tr_crops), embed_all(embedder, te_crops)
        row = f"| {epoch} | {loss:.3f} | {accuracy(knn_predict(tr_f, tr_y, te_f, args.k), te_y):.2%} |"
        if args.probe:
            row += f" {accuracy(linear_probe(tr_f, tr_y, te_f), te_y):.2%} |"
        print(row, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="models/fmnist-simclr")
    p.add_argument("--train", default="demo/fmnist/train")
    p.add_argument("--test", default="demo/fmnist/test")
    p.add_argument("--raw-size", type=int, default=28)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--curve", help="a train-encoder output directory: score each kept checkpoint")
    p.add_argument("--probe", action="store_true", help="with --curve: the linear probe too (slower)")
    p.add_argument("--epochs", type=int, nargs="*", help="with --curve: only these epochs (default: every one kept)")
    args = p.parse_args()
    if args.curve:
        return curve(args)

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
