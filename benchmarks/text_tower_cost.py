"""What the caption side of `embed.text` costs beside the image side, in the embed actor's own code.

Measures, in one process and one run, side by side on the same batches (random-init weights, the
same model either way): the image tower on a batch of crops (`OpenClipEmbedder.embed`), the text
tower on that batch's captions as the actor runs it (`embed_text`: trimmed to the longest caption),
and open_clip's own `encode_text` at the full 77-token context. The captions are LAION-like in
length (a mix of short alt-texts and long product titles: 4 to 40 words). Prints a table of
seconds per 1,000 samples and the ratios; docs/curation-stages.md, "Image-text pools",
quotes them.

    .venv/bin/python benchmarks/text_tower_cost.py [--model ViT-B-32] [--batch 32] [--batches 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from prune.embed.backends import make_embedder, resolve_precision
from prune.embed.settings import EmbedConfig

WORDS = ("photo of a red leather ankle boot with buckle on white background free shipping women men new "
         "vintage summer dress cotton shirt size large small blue striped bag canvas tote sneaker running "
         "sandal beach coat wool winter jacket pullover knit sweater trouser denim slim fit").split()


def captions(n: int, rng: np.random.Generator) -> list[str]:
    """LAION-like lengths: most short, some long titles (4 to 40 words)."""
    lengths = np.clip(rng.lognormal(2.3, 0.6, n).astype(int), 4, 40)
    return [" ".join(rng.choice(WORDS, k)) for k in lengths]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cfg = EmbedConfig(model=args.model, allow_random_init=True, text=True, precision=args.precision)
    emb = make_embedder(cfg, "cpu")
    size = emb.preprocess.size
    pixels = rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
    texts = captions(args.batch, rng)
    full_model, tok = emb.captions.model, emb.captions.tokenizer

    def full():
        with torch.inference_mode():
            if emb.precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return full_model.encode_text(tok(texts))
            return full_model.encode_text(tok(texts))

    image_s = timed(lambda: emb.embed(pixels), args.batches)
    text_s = timed(lambda: emb.embed_text(texts), args.batches)
    full_s = timed(full, args.batches)
    tokens = tok(texts).argmax(dim=-1).max().item() + 1
    per_k = 1000 / args.batch
    print(f"{args.model}, {resolve_precision(args.precision, 'cpu')}, batch {args.batch}, {torch.get_num_threads()} threads; "
          f"the batch's longest caption: {tokens} tokens of 77\n")
    print("| what | s per 1,000 samples | ratio to the image tower |")
    print("| --- | ---: | ---: |")
    for name, s in (("image tower (embed)", image_s), ("text tower as the actor runs it (embed_text)", text_s),
                    ("open_clip encode_text, 77 tokens", full_s)):
        print(f"| {name} | {s * per_k:.2f} | {s / image_s:.2f} |")


if __name__ == "__main__":
    main()
