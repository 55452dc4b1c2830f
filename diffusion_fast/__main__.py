"""``python -m diffusion_fast ...`` is ``diffusion-fast ...`` (so ``torchrun -m diffusion_fast`` works too)."""

import sys

from .cli import main

sys.exit(main())
