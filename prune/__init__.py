"""ssl-prune's library: pure functions and settings, testable without Ray (see docs/extending.md, "Layout of the code")."""
