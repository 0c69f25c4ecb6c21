"""Finetune stage entry point (what `ray job submit` runs): `python jobs/finetune.py [CONFIG] [KEY=VALUE ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout without `pip install -e .`

from llm.cli import main  # noqa: E402

raise SystemExit(main(["finetune", *sys.argv[1:]]))
