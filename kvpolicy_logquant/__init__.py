"""LogQuant and PartialLogQuant (arXiv 2503.19950) as kvpolicy policies."""
