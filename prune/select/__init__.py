"""Selection: policies (the order within a group, a registry) and exact keep cuts (cuts.py).

Adding a policy is one new file here holding a `Policy` subclass with `@POLICIES.register`, plus
its import below.
"""

from prune.select.policies import POLICIES, Policy, block_priorities, priorities  # noqa: F401
