"""The daemon's wiring and its command line."""
