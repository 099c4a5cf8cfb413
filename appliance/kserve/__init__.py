"""Generated code of the inference protocol the remote backend speaks (protos/appliance/kserve/; make protos)."""
