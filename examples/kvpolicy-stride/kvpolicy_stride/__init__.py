"""An example kvpolicy plugin: keep every ``stride``-th token in full precision."""
