"""The main job: every enabled stage in order, skipping what its manifest says is done.

    ray job submit --working-dir . -- python jobs/pipeline.py cluster/config.yaml
"""

import sys

from llm.cli import main

raise SystemExit(main(["run", *sys.argv[1:]]))
