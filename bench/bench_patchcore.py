"""Fit + test benchmark of PatchCore alone: ``bench_methods.py --methods patchcore`` (same options).

python bench/bench_patchcore.py --datasets mvtec_bottle --backbones efficientnet_lite0
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_methods import main

if __name__ == "__main__":
    main(["--methods", "patchcore", *sys.argv[1:]])
