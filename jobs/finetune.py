"""`ray job submit --working-dir . -- python jobs/finetune.py [CONFIG] [KEY=VALUE ...]`: the finetune stage alone."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout without `pip install -e .`

from llm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["finetune", *sys.argv[1:]]))
