"""The shipped CLIP (models/fmnist-clip): its training shards, and how good it is.

    .venv/bin/python benchmarks/fmnist_clip.py shards demo/fmnist-clip/train     # the training pool
    .venv/bin/ssl-prune train-clip configs/train_clip_fmnist.yaml                 # -> models/fmnist-clip
    .venv/bin/python benchmarks/fmnist_clip.py quality                             # needs the shards below

`shards` writes 1,700 Fashion-MNIST train images per class that no evaluation pool draws
(`prune.train.clip.clip_train_indices`), each with a describing caption from prune/demo/captions.py.

`quality` scores the CLIP on the 10k t10k images, through the open_clip backend (the embed stage's
path: `embed.backend=open_clip embed.pretrained=models/fmnist-clip`, text tower included):

- zero-shot: each image's class is the one whose prompts are nearest, with the pretraining judge's
  own functions and 7-template ensemble (prune/evaluate/pretrain.py), the classes named as the
  judge names them (prune.demo.fashion_mnist.CLASS_NAMES: "t-shirt/top", "trouser", ...) and by
  the caption builder's first noun of each ("t-shirt", "trousers", ...); and "a photo of {a}" alone;
- k-NN (cosine, k=20) as an image encoder, with benchmarks/encoder_quality.py's own loading and
  classifier, beside the SimCLR encoder (models/fmnist-simclr), for two banks: the 60k train
  images (docs/encoders.md's protocol for the SimCLR encoder) and the CLIP's own 17k training images.

It needs the labeled shards of configs/evaluate_fmnist.yaml:
    ssl-prune demo-data demo/fmnist/train --count 60000 --shard-size 5000
    ssl-prune demo-data demo/fmnist/test --split test --count 10000 --shard-size 5000
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import numpy as np

from prune.demo.captions import CLASS_NOUNS
from prune.demo.fashion_mnist import CLASS_NAMES
from prune.embed.backends import make_embedder
from prune.embed.settings import EmbedConfig
from prune.evaluate.pretrain import ZERO_SHOT_TEMPLATES, zero_shot_predict, zero_shot_weights
from prune.evaluate.probes import accuracy, knn_predict
from prune.train.clip import write_clip_shards

# each class by its own noun, the first of the caption builder's nouns ("t-shirt", "trousers", ...)
CLASS_NOUN_NAMES = tuple(CLASS_NOUNS[name][0] for name in CLASS_NAMES)


def _encoder_quality():
    """benchmarks/encoder_quality.py, for its `load` and `embed_all` (docs/encoders.md's k-NN protocol)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "encoder_quality.py")
    spec = importlib.util.spec_from_file_location("encoder_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zero_shot_accuracy(embedder, image_embeddings: np.ndarray, test_y: np.ndarray, names=CLASS_NAMES,
                       templates=ZERO_SHOT_TEMPLATES) -> float:
    """Zero-shot accuracy of an open_clip embedder (with its text tower) on embedded labeled images."""
    weights = zero_shot_weights(embedder.embed_text, names, templates)
    return accuracy(zero_shot_predict(image_embeddings, weights), test_y)


def quality(args) -> None:
    eq = _encoder_quality()
    t0 = time.time()
    clip = make_embedder(EmbedConfig(backend="open_clip", pretrained=args.clip, precision="fp32", text=True))
    simclr = make_embedder(EmbedConfig(backend="local", pretrained=args.simclr, precision="fp32"))
    rows = []
    test = {name: eq.load(args.test, e.preprocess, args.raw_size) for name, e in (("clip", clip), ("simclr", simclr))}
    test_emb, test_y = eq.embed_all(clip, test["clip"][0]), test["clip"][2]
    zero_shot = [(f"{names_label}, {templates_label}", zero_shot_accuracy(clip, test_emb, test_y, names, templates))
                 for names_label, names in (("class names", CLASS_NAMES), ("caption nouns", CLASS_NOUN_NAMES))
                 for templates_label, templates in ((f"the judge's {len(ZERO_SHOT_TEMPLATES)} templates", ZERO_SHOT_TEMPLATES),
                                                    ("'a photo of {a}' alone", ("a photo of {a}",)))]
    for bank_name, bank in (("60k train images", args.train), ("the CLIP's 17k training images", args.clip_train)):
        for name, emb in (("clip", clip), ("simclr", simclr)):
            tr_crops, _, tr_y = eq.load(bank, emb.preprocess, args.raw_size)
            te_crops, _, te_y = test[name]
            knn = accuracy(knn_predict(eq.embed_all(emb, tr_crops), tr_y, eq.embed_all(emb, te_crops), args.k), te_y)
            rows.append((bank_name, emb.model_id, len(tr_y), knn))
    print(f"\n{len(test['clip'][2])} test images, {time.time() - t0:.0f} s\n")
    print(f"| zero-shot ({clip.model_id}) | accuracy |\n| --- | ---: |")
    for label, acc in zero_shot:
        print(f"| {label} | {acc:.2%} |")
    print()
    print(f"| k-NN bank | encoder | bank size | k-NN (cosine, k={args.k}) |")
    print("| --- | --- | ---: | ---: |")
    for bank_name, model_id, n, knn in rows:
        print(f"| {bank_name} | {model_id} | {n} | {knn:.2%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("shards", help="write the CLIP's training shards")
    s.add_argument("out")
    s.add_argument("--per-class", type=int, default=1700)
    s.add_argument("--shard-size", type=int, default=2000)
    s.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("quality", help="zero-shot and k-NN accuracy on the t10k images")
    q.add_argument("--clip", default="models/fmnist-clip")
    q.add_argument("--simclr", default="models/fmnist-simclr")
    q.add_argument("--train", default="demo/fmnist/train")
    q.add_argument("--test", default="demo/fmnist/test")
    q.add_argument("--clip-train", default="demo/fmnist-clip/train")
    q.add_argument("--raw-size", type=int, default=28)
    q.add_argument("--k", type=int, default=20)
    args = p.parse_args()
    if args.what == "shards":
        summary = write_clip_shards(args.out, args.per_class, args.shard_size, args.seed)
        print(f"wrote {summary['images']} images in {len(summary['shards'])} shards to {args.out}")
    else:
        quality(args)


if __name__ == "__main__":
    main()
