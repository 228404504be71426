"""experts package (see ../README.md)."""
