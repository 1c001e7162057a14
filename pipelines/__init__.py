"""ssl-prune's Ray wiring: the stage protocol, the executor, the stages and the CLI (pipelines/cli)."""

from .quick_exit import install as _install_quick_exit

_install_quick_exit()  # every process that imports our pipelines: drivers, Ray workers, embed actors
