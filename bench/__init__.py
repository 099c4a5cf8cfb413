"""`make bench`: the daemon's speed measured against its own stages and a hand-written loop, in one run."""
