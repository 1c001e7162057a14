"""ssl-prune's Ray wiring: the stage protocol, the executor, the stages and the CLI (pipelines/cli)."""
