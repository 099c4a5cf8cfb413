"""What `make engine` does for each backend beyond the common build: one file per registry name (see ../target.py)."""
