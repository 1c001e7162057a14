"""The `ssl-prune` command: `run`, `train-encoder`, `evaluate` (CONFIG [key=value ...]) and `demo-data OUT`.

Errors a user can fix (config, missing weights, missing input) print one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from prune.settings import ConfigError

from .config import (  # noqa: F401
    EvaluateConfig,
    RunConfig,
    TrainEncoderConfig,
    load_config,
    validate_config,
)
from .jobs import evaluate, run, train_encoder  # noqa: F401  (the Python API)


def _run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    manifest = run(cfg)
    c = manifest["counts"]
    print(
        f"ssl-prune: {c['input_samples']} samples in {c['input_shards']} shards -> kept {c['kept']}, "
        f"pruned {c['pruned']}, failed {c['failed']} {json.dumps(c['failed_by_reason'])}; "
        f"{c['output_shards']} pruned shards in {cfg.output.rstrip('/')}/pruned"
    )
    return 0


def _train_encoder(args) -> int:
    result = train_encoder(load_config(args.config, args.overrides, TrainEncoderConfig))
    print(f"ssl-prune: encoder {result.architecture} ({result.embed_dim}-d) trained {result.steps} steps "
          f"(final loss {result.loss:.4f}); checkpoint in {result.checkpoint}")
    return 0


def _evaluate(args) -> int:
    result = evaluate(load_config(args.config, args.overrides, EvaluateConfig))
    print(f"ssl-prune: {result.runs} classifier runs; table {result.markdown}, plot {result.plot}")
    return 0


def _demo_data(args) -> int:
    from prune.demo.shards import write_demo_shards

    try:
        paths = write_demo_shards(
            args.out, split=args.split, count=args.count, shard_size=args.shard_size, seed=args.seed, start=args.start
        )
    except (FileNotFoundError, ValueError) as exc:  # no Fashion-MNIST installed, or bad counts
        raise ConfigError(str(exc)) from exc
    print(f"wrote {len(paths)} shards ({args.count} Fashion-MNIST {args.split} images) to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-prune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("run", help="prune shards: embed, prototypes, score, select, write")
    p.add_argument("config", help="YAML config (configs/demo.yaml, configs/laion.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. select.keep_fraction=0.5")
    p.set_defaults(fn=_run)
    for verb, fn, help_text, example in (
        ("train-encoder", _train_encoder, "train a self-supervised encoder (SimCLR) with Ray Train",
         "configs/train_fmnist.yaml"),
        ("evaluate", _evaluate, "accuracy vs keep fraction per policy, on labeled shards",
         "configs/evaluate_fmnist.yaml"),
    ):
        t = sub.add_parser(verb, help=help_text)
        t.add_argument("config", help=f"YAML config (e.g. {example})")
        t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        t.set_defaults(fn=fn)
    d = sub.add_parser("demo-data", help="write img2dataset-layout shards from Fashion-MNIST")
    d.add_argument("out")
    d.add_argument("--split", default="train", choices=["train", "test"])
    d.add_argument("--count", type=int, default=2000)
    d.add_argument("--shard-size", type=int, default=500)
    d.add_argument("--start", type=int, default=0)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_demo_data)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from prune.embed.errors import WeightsNotFoundError
    from prune.io.storage import InputError

    try:
        return args.fn(args)
    except (ConfigError, WeightsNotFoundError, InputError) as exc:  # the user's to fix; the rest are bugs
        print(f"ssl-prune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
