"""ssl-prune's Ray wiring: the stage protocol, the executor, the stages and the CLI (pipelines/cli).

Importing it has no side effect on the process: the CLI alone freezes the heap at exit
(pipelines/quick_exit.py) and filters fd 2 (pipelines/cli/noise.py).
"""
