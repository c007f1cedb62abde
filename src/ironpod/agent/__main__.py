"""``python -m ironpod.agent``: the node agent (also ``ironpod agent``)."""

import sys

from ironpod.agent.main import main

raise SystemExit(main(sys.argv[1:]))
