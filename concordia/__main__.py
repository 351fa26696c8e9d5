"""`python -m concordia ...` is the `concordia` command."""
import sys

from .cli import main

sys.exit(main())
