import sys

from fa_jax.cli import main

sys.exit(main())
