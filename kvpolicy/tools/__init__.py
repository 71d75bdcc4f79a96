"""Tools over the library: the retention plots and the generated YAML reference of the docs."""
