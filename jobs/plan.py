"""What to submit first to a real cluster: load the config, connect, print the plan and any shortfall.

    ray job submit --working-dir . -- python jobs/plan.py cluster/config.yaml
"""

import sys

from llm.cli import main

raise SystemExit(main(["plan", *sys.argv[1:], "--live"]))
