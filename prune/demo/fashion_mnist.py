"""Read Fashion-MNIST from its original idx files.

The demo and the tests need real images with known labels, offline and without extra
dependencies, so this reads the gzip'd idx files (as shipped by the `dataset-fashion-mnist`
system package) with gzip + numpy only.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

# Label i is CLASS_NAMES[i] (the order of the Fashion-MNIST README).
CLASS_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

_FILE_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08  # idx type code for unsigned bytes, the only one Fashion-MNIST uses


def idx_paths(split: str = "train", root: str = DEFAULT_ROOT) -> tuple[str, str]:
    """The (images, labels) idx file paths of a split; "test" is stored as "t10k"."""
    if split not in _FILE_PREFIX:
        raise ValueError(f"split must be one of {sorted(_FILE_PREFIX)}, got {split!r}")
    prefix = os.path.join(os.fspath(root), _FILE_PREFIX[split])
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def read_idx(path: str) -> np.ndarray:
    """Read one gzip'd idx file of unsigned bytes into an array of the shape its header gives.

    The header is: two zero bytes, a type code (0x08 = ubyte), the number of dimensions,
    then one big-endian uint32 per dimension.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {path}. "
            "`apt-get install -y dataset-fashion-mnist` provides it "
            f"(in {DEFAULT_ROOT}), or pass root= to a directory holding the idx files."
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or dtype != _IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {data[:4].hex()})")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {expected} bytes of data, file has {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 [N, 28, 28]) and labels (int64 [N], index into CLASS_NAMES) of a split.

    N is 60,000 for "train" and 10,000 for "test".
    """
    images_path, labels_path = idx_paths(split, root)
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{split}: images {images.shape} and labels {labels.shape} do not match")
    return images.copy(), labels  # copy: a writable array the caller owns
