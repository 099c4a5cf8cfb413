"""`make engine`: turn a model folder into the fastest artifact this host can run, behind an accuracy gate."""
