"""Serve config files generated from the cluster configs: `serve/local.yaml` and `serve/config.yaml`.

They are what `serve run` / `serve deploy` read: proxy options and the deployment's options derived from
the cluster config, and an import path whose args name the cluster file, so the model and every knob
still come from that one file. Regenerate with `python -m llm.serve.serveconfig`; a test checks they are
current.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from llm.config import LoadedConfig
from llm.loading import load_config
from llm.serve.app import APP_NAME, DEPLOYMENT, deployment_options, http_options
from llm.sizing import derive

ROOT = Path(__file__).resolve().parent.parent.parent
# serve file -> the cluster file it is generated from (paths relative to the checkout).
FILES = {"serve/local.yaml": "cluster/local.yaml", "serve/config.yaml": "cluster/config.yaml"}


def serve_config(loaded: LoadedConfig, cluster_file: str) -> dict[str, Any]:
    """Serve's deploy schema for one cluster config (the model is resolved when the app is built)."""
    cfg = loaded.llm.serve
    sizing = derive(loaded)
    options = deployment_options(cfg, sizing.cluster_cpus, sizing.cluster_gpus)
    return {
        "proxy_location": "HeadOnly" if loaded.cluster.get("provider", {}).get("type") == "local" else "EveryNode",
        "http_options": http_options(cfg),
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "llm.serve.app:build_app",
            "args": {"config": cluster_file, "overrides": []},
            "deployments": [{"name": DEPLOYMENT, **options}],
        }],
    }


def render(cluster_file: str, root: Path = ROOT) -> str:
    """The text of the serve file generated from `cluster_file`."""
    loaded = load_config(root / cluster_file)
    header = (f"# Generated from {cluster_file} by `python -m llm.serve.serveconfig`; edit that file, not this.\n"
              f"#   serve {'run' if 'local' in cluster_file else 'deploy'} "
              f"{next(k for k, v in FILES.items() if v == cluster_file)}   (from the checkout's root)\n")
    return header + yaml.safe_dump(serve_config(loaded, cluster_file), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """Write every serve file; `--check` only reports stale ones (exit 1)."""
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for target, source in FILES.items():
        text = render(source)
        path = ROOT / target
        if path.exists() and path.read_text() == text:
            continue
        stale.append(target)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    verb = "stale" if check else "written"
    print(f"{verb}: {', '.join(stale)}" if stale else "serve files are current")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
