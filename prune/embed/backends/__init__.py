"""Image embedders: one interface (base.py), one file per backend, each registered by name.

Adding a backend is one new file here, a subclass of `Embedder` decorated with
`@BACKENDS.register`, plus its import below; `embed.backend` then accepts its name.
"""

from prune.embed.backends.base import (  # noqa: F401  (the package's API)
    BACKENDS,
    Embedder,
    check_weights,
    cpu_supports_bf16,
    make_embedder,
    model_id_for,
    preprocess_spec_for,
    resolve_device,
    resolve_precision,
)
from prune.embed.errors import WeightsNotFoundError  # noqa: F401

# the backends shipped with the package register themselves on import
from prune.embed.backends import open_clip_backend, timm_backend, local_backend  # noqa: E402,F401  isort: skip
