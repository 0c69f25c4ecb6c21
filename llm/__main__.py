"""`python -m llm` is the `llmray` command."""

from llm.cli import main

raise SystemExit(main())
