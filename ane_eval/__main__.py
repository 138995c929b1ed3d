"""`python -m ane_eval ...` is the `ane-eval` command (so `torchrun --nproc-per-node N -m ane_eval run ...` works)."""
import sys

from .cli import main

sys.exit(main())
