"""`python -m pipelines.cli`: the `ssl-prune` command without the console script."""

import sys

from pipelines.cli import main

sys.exit(main())
