"""The stages shipped with the package, one file each; importing this package registers them.

Adding a stage is one new file here (a `Stage` dataclass with `@STAGES.register`; a curation stage
is a `ShardStage` with `removes = True`, as filter.py) plus its import below; a run config then
names it in `stages:` and configures it under the section its fields name.
"""

from . import (  # noqa: F401  (registration)
    assign,
    clip_score,
    dedup,
    embed,
    export,
    filter,
    import_embeddings,
    prototypes,
    select,
    write,
)

# train_encoder.py, train_clip.py and evaluate.py hold the stages of the `train-encoder`, `train-clip`
# and `evaluate` jobs, which build them directly: they are not `run` stages and are not registered

# `ssl-prune run`'s stages, in order, when the config does not list its own
RUN_STAGES = ("embed", "prototypes", "assign", "select", "write")
