"""`ray job submit -- python jobs/data.py [CONFIG] [KEY=VALUE ...]`: the data stage alone."""

import sys

from llm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["data", *sys.argv[1:]]))
