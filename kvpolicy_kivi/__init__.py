"""KIVI (arXiv 2402.02750) and sink+KIVI as kvpolicy policies."""
