"""ssl-prune's library: pure functions and settings, testable without Ray (see README, "Layout of the code")."""
