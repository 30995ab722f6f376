"""The ``classaware-prune`` command line."""
