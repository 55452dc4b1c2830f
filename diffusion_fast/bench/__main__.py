"""``python -m diffusion_fast.bench ...`` is ``diffusion-fast bench ...``."""

import sys

from .cli import main

sys.exit(main())
