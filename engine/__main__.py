"""`python -m engine` is the `vmweave` command."""
import sys

from .cli import main

sys.exit(main())
