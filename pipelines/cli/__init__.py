"""The `ssl-prune` command: `run`, `train-encoder`, `train-clip`, `evaluate` (CONFIG [key=value ...]) and `demo-data OUT`.

Also `extend PARENT`, `report OUTPUT`, and `config-reference` (docs/configuration.md, from the settings models).

Errors a user can fix (config, missing weights, missing input) print one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from prune.settings import ConfigError

# The Python API, imported on first use (PEP 562): `--help`, `demo-data` and config errors do not
# wait for Ray, torch and faiss to import.
_API = {
    "run": "jobs", "extend": "jobs", "evaluate": "jobs", "train_encoder": "jobs", "train_clip": "jobs",
    "load_config": "config", "validate_config": "config",
    "RunConfig": "config", "EvaluateConfig": "config", "TrainEncoderConfig": "config", "TrainClipConfig": "config",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ssl-prune")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _console(verbose: bool) -> None:
    """Our own lines at INFO; the libraries' (faiss's loader, Ray's) only with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ssl_prune").setLevel(logging.INFO)
    if verbose:
        os.environ["SSL_PRUNE_VERBOSE"] = "1"  # pipelines.runtime.VERBOSE_ENV (not imported: Ray would load)
    else:
        from .noise import hide_ray_noise

        hide_ray_noise()


def _printed(cfg) -> bool:
    """--print-config: the resolved config, as YAML a later run can read back."""
    import yaml

    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return True


def _quick_exit() -> None:
    """The verbs that run Ray skip Python's last garbage collection at exit, in this driver and in
    the Ray workers and actors it starts: about a second of CPU each (pipelines/quick_exit.py).
    Here, not on import: a Python API user's process exits as it always does."""
    from pipelines import quick_exit, runtime

    quick_exit.install()
    runtime.quick_exit_workers()


def _config_job(args, model_name: str, job_name: str, summary) -> int:
    """The verbs that take CONFIG and key=value overrides: the resolved config (--print-config), or
    the job run and its one summary line, `summary(result, cfg)`."""
    from . import config, jobs

    cfg = config.load_config(args.config, args.overrides, getattr(config, model_name))
    if args.print_config and _printed(cfg):
        return 0
    _quick_exit()
    print(summary(getattr(jobs, job_name)(cfg), cfg))
    return 0


def _run(args) -> int:
    return _config_job(args, "RunConfig", "run", lambda manifest, cfg: _summary_line(manifest, cfg.output))


def _summary_line(manifest: dict, output: str) -> str:
    c = manifest["counts"]
    line = f"ssl-prune: {c['input_shards']} shards"
    if "input_samples" in c:
        removed = f", removed {c['removed']} {json.dumps(c['removed_by_reason'])}" if c.get("removed") else ""
        line = (f"ssl-prune: {c['input_samples']} samples in {c['input_shards']} shards -> kept {c['kept']}, "
                f"pruned {c['pruned']}{removed}, failed {c['failed']} {json.dumps(c['failed_by_reason'])}")
    if "output_shards" in c:
        line += f"; {c['output_shards']} pruned shards in {output.rstrip('/')}/pruned"
    return line


def _extend(args) -> int:
    from pipelines.parents import ParentMismatch

    from .jobs import extend

    given = {o.partition("=")[0] for o in args.overrides}
    if "output" not in given or not given & {"input", "import_embeddings.path"}:
        raise ConfigError("extend needs input=NEW_SHARDS (or import_embeddings.path=NEW_EMBEDDINGS) and output=NEW_OUTPUT "
                          "(the rest is the parent's config)")
    _quick_exit()
    try:
        manifest = extend(args.parent, args.overrides)
    except ParentMismatch as exc:
        raise ConfigError(str(exc)) from None
    print(_summary_line(manifest, manifest["config"]["output"]) + f" (extends {args.parent})")
    return 0


def _report(args) -> int:
    from pipelines.report import build_report
    from prune import schema
    from prune.io.storage import OutputDir

    if not OutputDir(args.output).exists(schema.MANIFEST):
        raise ConfigError(f"{args.output} has no {schema.MANIFEST}: not the output of a finished `ssl-prune run`")
    print(f"ssl-prune: report in {build_report(args.output)}")
    return 0


def _train_encoder(args) -> int:
    return _config_job(args, "TrainEncoderConfig", "train_encoder", lambda r, _: (
        f"ssl-prune: encoder {r.architecture} ({r.embed_dim}-d) trained {r.steps} steps "
        f"(final loss {r.loss:.4f}); checkpoint in {r.checkpoint}"))


def _train_clip(args) -> int:
    return _config_job(args, "TrainClipConfig", "train_clip", lambda r, _: (
        f"ssl-prune: CLIP {r.model_id} trained on {r.pairs} image-caption pairs, {r.steps} steps "
        f"(final loss {r.loss:.4f}); checkpoint in {r.checkpoint}"))


def _evaluate(args) -> int:
    return _config_job(args, "EvaluateConfig", "evaluate", lambda r, _: (
        f"ssl-prune: {r.runs} classifier runs; table {r.markdown}, plot {r.plot}"))


def _config_reference(args) -> int:
    from .reference import config_reference

    return config_reference(args.output, args.check)


def _demo_data(args) -> int:
    from prune.demo.captions import parse_caption_mix
    from prune.demo.shards import write_demo_shards
    from prune.demo.web_like import COMPOSITION_FILE, SPLIT, write_web_like_shards

    web_options = {"imbalance": args.imbalance, "copy_share": args.copy_share, "junk_share": args.junk_share,
                   "caption_mix": args.caption_mix}
    given = {name: value for name, value in web_options.items() if value is not None}
    if not args.web_like:
        if given:
            raise ConfigError(f"--{next(iter(given)).replace('_', '-')} applies only with --web-like")
        try:
            paths = write_demo_shards(
                args.out, split=args.split, count=args.count, shard_size=args.shard_size, seed=args.seed,
                start=args.start, captions=args.captions,
            )
        except (FileNotFoundError, ValueError) as exc:  # no Fashion-MNIST installed, or bad counts
            raise ConfigError(str(exc)) from exc
        print(f"wrote {len(paths)} shards ({args.count} Fashion-MNIST {args.split} images) to {args.out}")
        return 0
    if args.split != SPLIT or args.start:
        raise ConfigError(f"--web-like builds from the {SPLIT} split from its start: drop --split and --start")
    if "caption_mix" in given:
        try:
            given["caption_mix"] = parse_caption_mix(given["caption_mix"])
        except ValueError as exc:
            raise ConfigError(f"--caption-mix: {exc}") from exc
    try:
        pool = write_web_like_shards(args.out, count=args.count, shard_size=args.shard_size, seed=args.seed, **given)
    except (FileNotFoundError, ValueError) as exc:  # no Fashion-MNIST installed, or bad counts or shares
        raise ConfigError(str(exc)) from exc
    kinds = ", ".join(f"{n} {kind}" for kind, n in pool.composition["kinds"].items())
    captions = ", ".join(f"{n} {kind}" for kind, n in pool.composition["caption_kinds"].items())
    print(f"wrote {len(pool.tars)} web-like shards ({args.count} Fashion-MNIST {SPLIT} samples: {kinds}; "
          f"captions: {captions}) to {args.out}; summary in {args.out.rstrip('/')}/{COMPOSITION_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssl-prune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's, faiss's and the workers' own log lines (hidden by default)")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb, fn, help_text, example in (
        ("run", _run, "prune shards: embed, prototypes, assign, [dedup,] select, write [, export]", "demo, laion"),
        ("train-encoder", _train_encoder, "train a self-supervised encoder (SimCLR) with Ray Train", "train_fmnist"),
        ("train-clip", _train_clip, "train a small CLIP (open_clip's model and loss) on image-caption shards",
         "train_clip_fmnist"),
        ("evaluate", _evaluate, "accuracy vs keep fraction per policy, on labeled shards", "evaluate_web"),
    ):
        t = sub.add_parser(verb, help=help_text)
        # optional for argparse only: a missing config is reported alone (argparse would also
        # call the optional overrides "required")
        t.add_argument("config", nargs="?", help=f"a YAML file, or the name of a shipped config ({example})")
        t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. select.keep_fraction=0.5")
        t.add_argument("--print-config", action="store_true",
                       help="print the resolved config (file + overrides + defaults) as YAML and exit")
        t.set_defaults(fn=fn, parser=t)
    x = sub.add_parser("extend", help="curate new shards against a finished run: its model, centroids, "
                                      "thresholds and kept samples, without refitting or re-reading it")
    x.add_argument("parent", help="the finished run's output directory (local or any fsspec URL)")
    x.add_argument("overrides", nargs="*", help="input=NEW_SHARDS output=NEW_OUTPUT, and any key=value of the "
                                                 "parent's config that does not change how it embeds or clusters")
    x.set_defaults(fn=_extend)
    r = sub.add_parser("report", help="rebuild OUTPUT/report.html from a finished run's outputs")
    r.add_argument("output", help="the run's output directory (local or any fsspec URL)")
    r.set_defaults(fn=_report)
    d = sub.add_parser("demo-data", help="write img2dataset-layout shards from Fashion-MNIST")
    d.add_argument("out", help="directory to write NNNNN.tar/.parquet/_stats.json into")
    d.add_argument("--split", default="train", choices=["train", "test"], help="Fashion-MNIST split (default train)")
    d.add_argument("--count", type=int, default=2000, help="images (default 2000)")
    d.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    d.add_argument("--start", type=int, default=0, help="index of the first image in the split (default 0)")
    d.add_argument("--seed", type=int, default=0, help="seed of the image order (default 0)")
    d.add_argument("--captions", default="class", choices=["class", "describe"],
                   help="without --web-like: 'a photo of a <class>' (default), or describing captions worded as "
                        "the web-like pool's (held-out pairs for the pretraining judge's retrieval)")
    from prune.demo import web_like  # the defaults in the help

    d.add_argument("--web-like", action="store_true",
                   help="a pool shaped like a web crawl (train split): long-tailed classes, altered near-copies "
                        "of a few popular images, junk; each sample's json says its kind")
    d.add_argument("--imbalance", type=float,
                   help=f"with --web-like: largest class / smallest class (default {web_like.DEFAULT_IMBALANCE:g})")
    d.add_argument("--copy-share", type=float,
                   help=f"with --web-like: share of altered near-copies, in [0, 1) "
                        f"(default {web_like.DEFAULT_COPY_SHARE:g})")
    d.add_argument("--junk-share", type=float,
                   help=f"with --web-like: share of off-distribution junk images, in [0, 1) "
                        f"(default {web_like.DEFAULT_JUNK_SHARE:g})")
    from prune.demo import captions

    d.add_argument("--caption-mix", metavar="KIND=SHARE,...",
                   help="with --web-like: shares of the non-junk samples' captions that name another class "
                        "(wrong) or say nothing (noise: file names, boilerplate; empty; spam); kinds not named 0, "
                        "the rest describe the image; junk says nothing "
                        f"(default {captions.format_mix(captions.DEFAULT_CAPTION_MIX)}; '' for all describe)")
    d.set_defaults(fn=_demo_data)
    c = sub.add_parser("config-reference", help="the configuration reference (every key, type, default, description), "
                                                "generated from the settings models")
    c.add_argument("--output", metavar="PATH", help="write it to PATH (docs/configuration.md) instead of printing it")
    c.add_argument("--check", action="store_true",
                   help="compare PATH (--output, default docs/configuration.md) with what the models generate; "
                        "exit 1 naming the lines that differ")
    c.set_defaults(fn=_config_reference)
    args = parser.parse_args(argv)
    if hasattr(args, "config") and args.config is None:
        args.parser.error("the following argument is required: config")
    _console(args.verbose)
    from prune.embed.errors import WeightsNotFoundError
    from prune.io.storage import InputError

    try:
        return args.fn(args)
    except (ConfigError, WeightsNotFoundError, InputError) as exc:  # the user's to fix; the rest are bugs
        print(f"ssl-prune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
