"""The image `make image` builds (see build.py)."""
