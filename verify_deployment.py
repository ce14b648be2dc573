"""Check an installation before a long training run: ``python verify_deployment.py --help``.

Prints a ✅/⚠️/❌ table (Python and packages, torch/GPU, FLUX.1-Fill folder, SigLIP, data,
reward servers, output folder, free disk) and exits 1 when any check fails.
"""

import sys

from train.verify import main

if __name__ == "__main__":
    sys.exit(main())
