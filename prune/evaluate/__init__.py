"""Does the pruning help a learner? Accuracy of classifiers trained on pruned subsets only.

Sorscher et al.'s figure, on a labeled set in our shard format: for every policy and keep
fraction, train a fixed classifier on the kept subset of a pool and score it on the full test
set. Everything here is pure (numpy, torch, faiss; no Ray) so it can be tested piece by piece;
pipelines/stages/evaluate.py wires it to the embed stage and runs the trainings as Ray tasks.

layout.py (outputs, columns), labels.py (labels joined with embeddings), subsets.py (prototypes
and selections, by the stages' own library calls), classifiers.py, results.py (csv, tables, plot).
"""

from prune.evaluate.classifiers import *  # noqa: F401,F403
from prune.evaluate.labels import *  # noqa: F401,F403
from prune.evaluate.layout import *  # noqa: F401,F403
from prune.evaluate.results import *  # noqa: F401,F403
from prune.evaluate.subsets import *  # noqa: F401,F403
