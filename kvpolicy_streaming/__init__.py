"""StreamingLLM (arXiv 2309.17453) as a kvpolicy policy."""
