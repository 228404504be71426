"""kernels package (see ../README.md)."""
