"""engine package (see ../README.md)."""
