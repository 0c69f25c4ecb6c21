"""Compression ratios, measured side by side in one run (not a pass/fail test).

    python bench/compress.py [--work DIR] [--steps 300] [--distill-steps 150]
    python bench/compress.py --shape qwen2.5-0.5b [--threads N]

A Llama-style model of ~22M parameters (6 layers, 512 wide, MLP 1536, vocabulary 4096) is pretrained
briefly on Python's help topics by the pretrain stage's own loop (in this process: `sizing.workers: 0`,
fp32, ZeRO-0) and kept in `--work` for later runs. Then, on the same 64 held-out packed rows and the same
prompt:

1. int8 (`llm.compress`: torch.ao dynamic, saved int8 and reloaded by the one loader) against fp32:
   weights file size, greedy tokens/s at batch 1 and 8, perplexity. torchao's CPU int8 configs are
   measured beside it (in memory) so the CPU kernel choice shows its numbers.
2. 50% of MLP channels pruned (activation-aware), then distilled from the original through the one train
   loop with the KL loss hook: parameters, tokens/s, perplexity before and after distillation.

With `--shape qwen2.5-0.5b` (or `llama-3.2-1b`) it measures where users live instead: a model of that
published shape with random weights, built on the meta device from the family's own config class (the
pretrain stage's `type:` path, `llm.train.model.hf_config`) and materialised in fp32, then int8 and 50% of
MLP channels pruned by the compress stage's own functions (in memory: the variant files hold exactly these
modules), greedy tokens/s at batch 1 against fp32. No training, no data stage: speed does not depend on
what the weights learned.

Each goal line ends with `(goal <= X)` or `(goal >= X)`, the measured figure the last number before it.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm.loading import load_config

ROOT = Path(__file__).resolve().parent.parent
SEQ, VOCAB, VAL_ROWS, NEW_TOKENS = 128, 4096, 64, 32
MODEL = ["pretrain.model.arch=llama", "pretrain.model.n_layers=6", "pretrain.model.d_model=512",
         "pretrain.model.n_heads=8", "pretrain.model.d_ff=1536", f"pretrain.model.context={SEQ}"]
LOOP = ["precision=fp32", "zero_stage=0", "micro_batch_size=8", "checkpoint_every=100000", "eval_every=100000",
        "log_every=10", "max_failures=0", "sizing.workers=0"]


def config(work: Path, steps: int, distill_steps: int) -> Any:
    overrides = [f"storage={work / 'runs'}", "run=bench-compress", f"data.seq_len={SEQ}", *MODEL,
                 f"pretrain.max_steps={steps}", "pretrain.lr.peak=1e-3", "pretrain.lr.warmup_steps=30",
                 *(f"pretrain.{o}" for o in LOOP if not o.startswith("sizing")), "pretrain.sizing.workers=0",
                 f"compress.distill.max_steps={distill_steps}", "compress.distill.lr.peak=1e-3",
                 "compress.distill.lr.warmup_steps=10",
                 *(f"compress.distill.{o}" for o in LOOP if not o.startswith("sizing")), "compress.sizing.workers=0"]
    return load_config(ROOT / "cluster" / "local.yaml", overrides).llm


def data_stage(cfg: Any) -> Path:
    """Tokenizer trained on Python's help topics, packed train/val shards, committed as the data stage."""
    from pydoc_data.topics import topics

    import numpy as np

    from llm.data.tokenizer import train_tokenizer
    from llm.manifest import read_manifest, write_manifest
    from llm.stage import config_hash
    from llm.train.data import write_rows

    folder = Path(cfg.stage_dir("data"))
    if read_manifest(folder) is not None:
        return folder
    texts = [topics[k] for k in sorted(topics)]
    tok = train_tokenizer(texts, folder / "tokenizer", vocab_size=VOCAB, min_frequency=2)
    stream: list[int] = []
    for text in texts:
        stream += tok(text)["input_ids"] + [tok.eos_token_id]
    rows = np.asarray(stream[: len(stream) // SEQ * SEQ], dtype=np.int32).reshape(-1, SEQ)
    val = rows[::20]  # every 20th row held out
    train = np.delete(rows, np.arange(0, len(rows), 20), axis=0)
    write_rows(train, folder / "packed" / "train", shards=4)
    write_rows(val, folder / "packed" / "val", shards=1)
    write_manifest(folder, "data", config_hash(cfg, "data"), {}, {"train_rows": len(train), "val_rows": len(val)})
    return folder


def measure(name: str, model: Any, tok: Any, val: Any, prompt: list[int], folder: Path | None) -> dict[str, Any]:
    from llm.eval import packed_perplexity, param_count, tokens_per_second

    model.eval()
    pad = tok.pad_token_id
    out = {"name": name, "params": param_count(model), "ppl": packed_perplexity(model, val)["ppl"],
           "b1": tokens_per_second(model, prompt, 1, NEW_TOKENS, pad),
           "b8": tokens_per_second(model, prompt, 8, NEW_TOKENS, pad),
           "bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder else None}
    size = f"{out['bytes'] / 2**20:7.1f} MB" if out["bytes"] else "      -   "
    print(f"  {name:<34} params {out['params'] / 1e6:5.1f}M  file {size}  ppl {out['ppl']:8.3f}  "
          f"tok/s b1 {out['b1']:7.1f}  b8 {out['b8']:7.1f}", flush=True)
    return out


def torchao_rows(fp32: Any, tok: Any, val: Any, prompt: list[int]) -> list[dict[str, Any]]:
    """torchao's CPU int8 configs on the same model (in memory): what the CPU kernel choice compares with."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("  torchao not installed: its configs not measured", flush=True)
        return []
    from llm.eval import tokens_per_second

    rows = []
    for cfg_cls in (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig):
        model = copy.deepcopy(fp32)
        name = f"torchao {cfg_cls.__name__[:-6]}"
        try:
            quantize_(model, cfg_cls())
            # Batch 1 only: the CPU kernel choice is about decoding speed, and these paths are slow enough
            # that the full set of figures would dominate the bench's run time.
            b1 = tokens_per_second(model, prompt, 1, NEW_TOKENS, tok.pad_token_id, repeats=1)
            rows.append({"name": name, "b1": b1})
            print(f"  {name:<34} tok/s b1 {b1:7.1f}", flush=True)
        except Exception as e:  # a config without a CPU path: report it, measure the rest
            print(f"  {name}: failed ({type(e).__name__}: {str(e)[:100]})", flush=True)
    return rows


# Published shapes (config.json of each model), as `pretrain.model` fields: type, shape, and the family's own.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {"vocab": 151936, "model": {
        "type": "qwen2", "n_layers": 24, "d_model": 896, "n_heads": 14, "n_kv_heads": 2, "d_ff": 4864,
        "context": 32768, "tie_embeddings": True, "config": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6}}},
    "llama-3.2-1b": {"vocab": 128256, "model": {
        "type": "llama", "n_layers": 16, "d_model": 2048, "n_heads": 32, "n_kv_heads": 8, "d_ff": 8192,
        "context": 131072, "tie_embeddings": True, "config": {"rms_norm_eps": 1e-5, "rope_scaling": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}},
}


def shaped_model(name: str) -> Any:
    """A model of the published shape `name`, random weights: built on the meta device, then materialised
    in fp32 and initialised by the family's own `init_weights` (rotary buffers and tying included)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm.config import ModelConfig
    from llm.train.model import hf_config

    shape = SHAPES[name]
    config = hf_config(ModelConfig(**shape["model"]), shape["vocab"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    return model.eval()


def shape_bench(name: str, threads: int, rounds: int = 3) -> None:
    """int8 and MLP-pruned against fp32 at a realistic shape: greedy tokens/s at batch 1, the three models
    measured in turn for `rounds` rounds and the best of each kept (a shared machine's load moves in between)."""
    import copy

    import numpy as np
    import torch

    from llm.compress.prune import prune_model
    from llm.compress.quantize import quantize_dynamic_int8
    from llm.eval import param_count, tokens_per_second

    t0 = time.perf_counter()
    fp32 = shaped_model(name)
    vocab = SHAPES[name]["vocab"]
    print(f"{name}: {param_count(fp32) / 1e6:.0f}M parameters, built on meta and materialised in fp32 "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, vocab, size=(4, 64))
    prompt = rng.integers(0, vocab, size=16).tolist()
    t0 = time.perf_counter()
    models = {"fp32": fp32, "pruned 50% MLP": prune_model(fp32, calib, mlp_ratio=0.5, head_ratio=0.0, multiple_of=64)}
    print(f"pruned 50% MLP: {param_count(models['pruned 50% MLP']) / 1e6:.0f}M parameters "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    int8 = copy.deepcopy(fp32)
    quantize_dynamic_int8(int8, embeddings=True)  # the variant's modules, in memory
    models["int8 (torch.ao dynamic)"] = int8
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantized engine "
          f"{torch.backends.quantized.engine}; greedy, {NEW_TOKENS} new tokens after a 16-token prompt, "
          f"best of {rounds} interleaved rounds", flush=True)
    best = dict.fromkeys(models, 0.0)
    for r in range(rounds):
        for label, model in models.items():
            best[label] = max(best[label], tokens_per_second(model, prompt, 1, NEW_TOKENS, 0, repeats=1))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in best.items()) + " tok/s", flush=True)
    fp, pr, q = best["fp32"], best["pruned 50% MLP"], best["int8 (torch.ao dynamic)"]
    print(f"{name} int8 generation tokens/s / fp32, batch 1: {q / fp:.2f} (goal >= 2.5)")
    print(f"{name} pruned (MLP 50%) generation tokens/s / fp32, batch 1: {pr / fp:.2f} (goal >= 1.4)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/llmray-bench-compress")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads while measuring (1: a shared, oversubscribed machine stalls OpenMP barriers)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="measure int8 and pruned speed at this published shape (random weights) instead")
    args = ap.parse_args()
    if args.shape:
        shape_bench(args.shape, args.threads)
        return
    import torch

    from llm import storage
    from llm.compress import variants
    from llm.compress.distill import DistillJob, distill
    from llm.config import ModelConfig
    from llm.eval import packed_rows
    from llm.models.load import load_model
    from llm.train import pretrain

    work = Path(args.work)
    threads = torch.get_num_threads()
    cfg = config(work, args.steps, args.distill_steps)
    data = data_stage(cfg)
    t0 = time.perf_counter()
    teacher_dir = Path(pretrain.run(cfg).path) / "model"
    print(f"teacher: {teacher_dir} ({time.perf_counter() - t0:.0f} s; {args.steps} steps, kept for later runs)")
    val = packed_rows(data, VAL_ROWS)
    calib = variants.calibration_rows(storage.Folder(data), 32)
    base = load_model(teacher_dir)
    prompt = val[0][:16].tolist()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantized engine "
          f"{torch.backends.quantized.engine}; {VAL_ROWS} val rows x {SEQ}, {NEW_TOKENS} new tokens per row")
    fp = measure("fp32", base.model, base.tokenizer, val, prompt, teacher_dir)
    int8_dir = variants.build_int8(teacher_dir, work / "int8", calib, True, "cpu", "int8_weight_only")
    q = measure("int8 (torch.ao dynamic, reloaded)", load_model(int8_dir).model, base.tokenizer, val, prompt, int8_dir)
    for row in torchao_rows(base.model, base.tokenizer, val, prompt):
        print(f"{row['name']} generation tokens/s / fp32, batch 1: {row['b1'] / fp['b1']:.2f}")
    pruned_dir = variants.build_pruned(teacher_dir, work / "pruned", calib, 0.5, 0.0, 8)
    pr = measure("pruned 50% MLP", load_model(pruned_dir).model, base.tokenizer, val, prompt, pruned_dir)
    torch.set_num_threads(threads)  # training uses every core; measuring goes back to --threads below
    t0 = time.perf_counter()
    shutil.rmtree(work / "distill", ignore_errors=True)  # distil anew each run (no resume from the last one)
    job = DistillJob(work=storage.Folder(work / "distill"), data=storage.Folder(data), teacher=teacher_dir,
                     teacher_uri=str(teacher_dir), student=ModelConfig(path=str(pruned_dir)), sft=False)
    exported = distill(cfg, job)
    distilled_dir = variants.place_export(exported, work / "pruned-distilled")
    print(f"  distillation: {args.distill_steps} steps in {time.perf_counter() - t0:.0f} s (the one loop, KL hook)")
    torch.set_num_threads(args.threads)
    pd = measure("pruned 50% MLP + distilled", load_model(distilled_dir).model, base.tokenizer, val, prompt,
                 distilled_dir)
    print(f"int8 size / fp32 size: {q['bytes'] / fp['bytes']:.3f} (goal <= 0.35)")
    print(f"int8 generation tokens/s / fp32, batch 1: {q['b1'] / fp['b1']:.2f} (goal >= 3.0)")
    print(f"int8 generation tokens/s / fp32, batch 8: {q['b8'] / fp['b8']:.2f}")
    print(f"int8 perplexity / fp32: {q['ppl'] / fp['ppl']:.4f} (goal <= 1.03)")
    print(f"pruned+distilled parameters / fp32: {pd['params'] / fp['params']:.3f} (goal <= 0.7)")
    print(f"pruned+distilled generation tokens/s / fp32, batch 1: {pd['b1'] / fp['b1']:.2f} (goal >= 1.3)")
    print(f"pruned+distilled generation tokens/s / fp32, batch 8: {pd['b8'] / fp['b8']:.2f}")
    print(f"pruned perplexity / fp32 before distillation: {pr['ppl'] / fp['ppl']:.4f}")
    print(f"pruned+distilled perplexity / fp32: {pd['ppl'] / fp['ppl']:.4f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
