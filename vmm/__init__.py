"""vmm package (see ../README.md)."""
