"""Bring your own model, the whole route per family on the session's Ray: each zoo family's directory (its own
`transformers` config class, tokenizer specials and chat template; tests/models/zoo.py) as `finetune.base`
with chat data and no data stage; LoRA fine-tuning on Ray Train + DeepSpeed; the compress stage (int8 and
MLP + head pruning, or the one-line refusal where heads cannot be pruned to a standard config); then the
serve stage hosting every family's chosen model side by side, each answering a chat request through its own
template that ends at its own end-of-turn token.

Small settings (one worker, two steps, a few eval rows): the per-family depth of each stage is tested in
tests/train/test_finetune_families*.py, tests/compress/test_*_families.py and tests/serve/test_families.py;
this module proves the stages hand each family on to the next.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llm.compress.prune import LAYOUTS
from llm.errors import ConfigError
from tests.conftest import tiny_config
from tests.models import conftest as zoo_fixtures
from tests.models.zoo import FAMILIES
from tests.train.test_finetune_helpers import label_ends, sft_records, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.multiprocess, pytest.mark.slow]
zoo = zoo_fixtures.zoo
ASK = [{"role": "user", "content": "Say river twice."}]
SETTINGS = (
    "finetune.enabled=true", "finetune.method=lora", "finetune.zero_stage=2", "finetune.max_steps=2",
    "finetune.micro_batch_size=4", "finetune.checkpoint_every=2", "finetune.eval_every=2",
    "finetune.eval_batches=1", "finetune.log_every=1", "finetune.lr.warmup_steps=0", "finetune.lr.peak=3e-3",
    "finetune.max_failures=0", "finetune.sizing={workers: 1, cpus_per_worker: 1}", "finetune.eval.enabled=false",
    "compress.enabled=true", "compress.variants=[int8, pruned]", "compress.prune.mlp_ratio=0.5",
    "compress.prune.calib_rows=4", "compress.prune.multiple_of=4", "compress.eval.val_rows=8",
    "compress.eval.sft_rows=8", "compress.eval.prompts=2", "compress.eval.max_new_tokens=4",
    "compress.eval.speed_tokens=4", "compress.eval.serve_batch=2", "compress.eval.lm_eval.tasks=[]",
    "compress.choose.max_ppl_increase=1000", "compress.choose.max_rouge_drop=1", "compress.choose.min_speed_ratio=0",
    "compress.sizing.workers=0", "data.seq_len=64", "data.sft.max_len=256", "data.sft.val_fraction=0.1",
    "sweep.enabled=false", "serve.enabled=false",
)

WIDER = {"phi3": ("finetune.zero_stage=3", "finetune.sizing={workers: 2, cpus_per_worker: 1}")}
"""Phi-3's fused projections fine-tuned by 2 DeepSpeed workers under ZeRO-3 (the adapter gathered from the
partitions, then merged); Gemma 2's 2-worker run is test_finetune_families_ray.py's full fine-tune."""


def _route(zoo: Any, root: Path, family: str) -> dict[str, Any]:
    """Finetune then compress one family; what the tests read of it. GPT-2's heads are asked to be pruned
    first: the refusal comes before any work, then the route goes on with its MLP pruned only."""
    from llm.compress.stage import run as compress
    from llm.models.load import chosen_model_dir
    from llm.train.finetune import run as finetune

    chat = write_jsonl(root / "chat.jsonl", sft_records(48))
    refuses_heads = LAYOUTS[FAMILIES[family].model_type].heads_refused is not None

    def cfg(*extra: str) -> Any:
        return tiny_config(root, f"finetune.base={zoo(family)}", f"finetune.data=[{chat}]", *SETTINGS,
                           f"run=route-{family}", *WIDER.get(family, ()), *extra).llm

    tuned = finetune(cfg())
    refusal = None
    if refuses_heads:
        with pytest.raises(ConfigError) as refused:
            compress(cfg("compress.prune.head_ratio=0.5"))
        refusal = str(refused.value)
    final = cfg(f"compress.prune.head_ratio={0 if refuses_heads else 0.5}")
    packed = compress(final)
    return {"finetune": tuned, "compress": packed, "refusal": refusal, "chosen": chosen_model_dir(final)}


@pytest.fixture(scope="module")
def routes(ray_session, zoo, tmp_path_factory: pytest.TempPathFactory):
    """Every family fine-tuned and compressed, then one serve stage hosting each family's chosen model."""
    from ray import serve

    from llm.serve.stage import run as serve_stage
    from tests.serve.conftest import free_port

    root = tmp_path_factory.mktemp("route")
    out = {family: _route(zoo, root, family) for family in sorted(FAMILIES)}
    port = free_port()
    first, *rest = sorted(FAMILIES)
    models = json.dumps({f: out[f]["chosen"] for f in rest})
    cfg = tiny_config(root, f"serve.model={out[first]['chosen']}", f"serve.name={first}", f"serve.models={models}",
                      f"serve.port={port}", "serve.min_replicas=1", "serve.max_replicas=1",
                      "serve.foreground=false").llm
    served = serve_stage(cfg)
    yield out, served, f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_fine_tunes_compresses_and_serves_its_chat(routes, zoo, family: str) -> None:
    import openai
    from transformers import AutoConfig, AutoTokenizer

    out, _, url = routes
    spec, route = FAMILIES[family], out[family]
    end = spec.turn_end or spec.eos
    # finetune: LoRA on Ray Train, the family's own template closing every answer with its end-of-turn
    tuned = Path(route["finetune"].path)
    m = route["finetune"].metrics
    assert not route["finetune"].skipped and m["method"] == "lora" and m["steps"] == 2 and m["data"]["rendered"]
    tok = AutoTokenizer.from_pretrained(str(tuned / "model"))
    end_id = tok.convert_tokens_to_ids(end)
    assert label_ends(tuned) == {end_id}
    assert AutoConfig.from_pretrained(str(tuned / "model")).model_type == spec.model_type
    if family in WIDER:  # 2 workers, ZeRO-3: a non-empty adapter on the fused projections, merge parity
        from tests.train.test_finetune_ray import check_lora_outputs

        saved = json.loads((tuned / "adapter" / "adapter_config.json").read_text())
        assert set(saved["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
        assert sorted(p.name for p in (tuned / "ranks").iterdir()) == ["rank0.json", "rank1.json"]
        check_lora_outputs(tuned, zoo(family))
    # compress: int8 and pruned evaluated against the original on the fine-tuning data (no data stage), one chosen
    folder = Path(route["compress"].path)
    rows = {r["model"]: r for r in json.loads((folder / "eval.json").read_text())["rows"]}
    assert list(rows) == ["original", "int8", "pruned"]
    assert rows["pruned"]["params"] < rows["original"]["params"]
    assert all(r["sft_loss"] and r["tok_s_b1"] for r in rows.values())  # on the rendered chat rows: no packed text
    pruned = AutoConfig.from_pretrained(str(folder / "pruned"))
    assert pruned.model_type == spec.model_type  # a standard config of the same family
    if LAYOUTS[spec.model_type].heads_refused:
        assert route["refusal"].startswith("metadata.llm.compress.prune.head_ratio: ") and family in route["refusal"]
    chosen = json.loads((folder / "chosen.json").read_text())
    assert route["chosen"] == (str(folder / chosen["variant"]) if chosen["variant"] != "original"
                               else str(tuned / "model"))
    # serve: the chosen model answers a chat through the family's template and stops at its end-of-turn
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    answer = client.chat.completions.create(model=family, messages=ASK, max_tokens=6, temperature=0,
                                            logit_bias={str(end_id): 100})
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens == 1
    free = client.chat.completions.create(model=family, messages=ASK, max_tokens=4, temperature=0)
    assert free.usage.completion_tokens >= 1 and free.choices[0].finish_reason in ("stop", "length")


def test_the_serve_stage_hosts_each_familys_chosen_model(routes) -> None:
    out, served, url = routes
    import httpx

    names = sorted(m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"])
    assert names == sorted(FAMILIES)
    assert not served.skipped
