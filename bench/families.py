"""The family x stage table: every model family of the zoo through every stage, from one run of their tests.

    python bench/families.py [PYTEST ARGS ...]

Runs the tests that take each zoo family (tests/models/zoo.py: a tiny random model per family from its own
`transformers` config class, with its real special tokens and chat template) through a stage, in one pytest
run, and prints one row per family and one column per stage: `ok`, `FAIL` or `-` (not run for that
family). Not a benchmark: the table a closing note or a release note pastes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLUMNS = {  # test function -> column (what passing it shows for that family)
    "test_family_keeps_its_real_layout": "layout",
    "test_every_family_builds_and_trains_one_step": "pretrain",
    "test_labels_are_the_answers_closed_by_the_families_end_of_turn": "SFT labels",
    "test_lora_wraps_the_families_projections_and_the_merge_equals_base_plus_adapter": "LoRA+merge",
    "test_full_export_keeps_the_family": "full export",
    "test_gemma2_full_zero3_with_system_prompts": "Ray ZeRO",
    "test_every_linear_layer_is_int8_and_the_variant_generates": "int8",
    "test_silenced_channels_and_groups_pruned_leave_logits_and_generation_unchanged": "prune",
    "test_gpt2_heads_refused_in_one_line": "prune",
    "test_end_of_turn_is_read_from_each_family_template": "stops",
    "test_family_chat_renders_its_template_and_ends_at_its_turn_end": "served chat",
    "test_family_fine_tunes_compresses_and_serves_its_chat": "Ray route",
}
FILES = ["tests/models/test_zoo.py", "tests/train/test_model_families.py", "tests/train/test_finetune_families.py",
         "tests/train/test_finetune_families_ray.py", "tests/compress/test_quantize_families.py",
         "tests/compress/test_prune_families.py", "tests/models/test_stops.py", "tests/serve/test_families.py",
         "tests/test_families_route.py"]
FAMILY_OF = {"test_gemma2_full_zero3_with_system_prompts": "gemma2",
             "test_gpt2_heads_refused_in_one_line": "gpt2"}


def results(xml: Path) -> dict[tuple[str, str], str]:
    """(family, column) -> ok | FAIL from a junit file; a column failing in any of its tests is FAIL."""
    from tests.models.zoo import FAMILIES

    out: dict[tuple[str, str], str] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name", "")
        m = re.fullmatch(r"(\w+)(?:\[(\w+)\])?", name)
        if not m or m.group(1) not in COLUMNS:
            continue
        family = m.group(2) or FAMILY_OF.get(m.group(1))
        if family not in FAMILIES or case.find("skipped") is not None:
            continue
        failed = case.find("failure") is not None or case.find("error") is not None
        key = (family, COLUMNS[m.group(1)])
        out[key] = "FAIL" if failed or out.get(key) == "FAIL" else "ok"
    return out


def main(argv: list[str]) -> int:
    from tests.models.zoo import FAMILIES

    with tempfile.TemporaryDirectory(prefix="llmray-families-") as tmp:
        xml = Path(tmp) / "families.xml"
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                               *FILES, *argv], cwd=ROOT, check=False).returncode
        found = results(xml)
    columns = list(dict.fromkeys(COLUMNS.values()))
    width = max(len(c) for c in columns) + 2
    print("\nfamily    " + "".join(c.ljust(width) for c in columns))
    for family in sorted(FAMILIES):
        print(family.ljust(10) + "".join(found.get((family, c), "-").ljust(width) for c in columns))
    print("ok: its test passed for that family in this run; -: no test of that stage takes that family "
          "(Ray ZeRO: the 2-worker DeepSpeed runs; full export: the families whose config differs most;\n"
          "Ray route: the finetune (LoRA), compress (int8 + pruned) and serve stages one after another on a real Ray)")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
