"""``python -m flowssm.train CONFIG.yaml [dotted.key=value ...]``: the same as ``flowssm train``."""

import sys

from flowssm.train.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
