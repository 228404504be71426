"""cachepool package (see ../README.md)."""
