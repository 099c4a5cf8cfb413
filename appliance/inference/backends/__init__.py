"""One file per inference backend; `appliance/inference/registry.py` lists them."""
