#!/usr/bin/env bash
# GPU check of issue 14, prepared for a session that has the GPU machine (the `device` tool); it has NOT
# been run yet (the session that wrote it had no GPU). Budget: under 8 minutes on one H200-class GPU.
#
#   bash bench/gpu_check.sh            # writes bench/results/gpu.md (+ raw outputs under bench/results/gpu/)
#
# 1. bf16 train-rm on a model built from a Qwen2.5-0.5B-shaped config (random init: no hub there either):
#    pairs/s, tokens/s and MFU (6 x params x tokens/s / the GPU's dense bf16 peak).
# 2. ppo-lag with LoRA for a few updates on the same shape: generate tok/s inside ppo-lag against a raw
#    generate() of the same actor, batch and length (bench/ppo_speed.py).
# 3. train-rm under DeepSpeed ZeRO-2 on CUDA (one process) must finish.
# 4. measured peak GPU memory of 1 and 3 next to `safealign plan`'s prediction for the same settings.
# Each step has its own timeout so one hang cannot eat the budget; a failed step is reported, not fatal.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false SAFEALIGN_NO_PROGRESS=1
R=bench/results/gpu; mkdir -p "$R"
W=$(mktemp -d)
[ -x "$PY" ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'; } > "$R/install.log" 2>&1   # torch with CUDA from the index
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$R/gpu.txt" 2>&1

# ---- models: Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864), vocab 151936
timeout 120 "$PY" - "$W" > "$R/build.log" 2>&1 <<'PYEOF'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
from safealign.data.synth import WorldConfig, write_world
from safealign.models.loading import load_tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification
write_world(WorldConfig(seed=0, n_pairs=2048, n_sft=200, n_train_prompts=600, n_eval_prompts=20, n_safety_prompts=20), w / "world")
texts = [json.loads(l)["prompt"] for l in (w / "world" / "sft.jsonl").read_text().splitlines()]
texts += [json.loads(l)["response"] for l in (w / "world" / "sft.jsonl").read_text().splitlines()]
tok = load_tokenizer("tiny", train_texts=texts, vocab_size=1024)
cfg = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
           max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
           bos_token_id=tok.bos_token_id)
Qwen2ForCausalLM(Qwen2Config(**cfg)).save_pretrained(w / "policy"); tok.save_pretrained(w / "policy")
for i, name in enumerate(("rm", "cm")):
    Qwen2ForSequenceClassification(Qwen2Config(**cfg, num_labels=1)).save_pretrained(w / name); tok.save_pretrained(w / name)
print(sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**cfg)).parameters()))
PYEOF
PARAMS=$(tail -1 "$R/build.log")

# ---- 1. bf16 train-rm
timeout 150 "$PY" -m safealign train-rm --model "$W/policy" --data "$W/world/preferences.jsonl" --output-dir "$W/rm-bf16" --dtype bf16 \
  --batch-size 16 --max-steps 60 --max-length 512 --eval-split 0.05 --save-steps 0 --log-steps 10 > "$R/train_rm_bf16.log" 2>&1
echo "rc=$?" >> "$R/train_rm_bf16.log"
timeout 30 "$PY" -m safealign plan --stage train-rm --model "$W/policy" --gpus 1 --gpu-mem 141GB --batch-size 16 --seq-len 512 \
  --output "$R/plan_train_rm.json" > "$R/plan_train_rm.txt" 2>&1

# ---- 2. ppo-lag with LoRA (and full) on the same shape, generate tok/s vs raw generate()
timeout 200 "$PY" bench/ppo_speed.py --hidden 896 --layers 24 --heads 14 --mem-hidden 0 --steps 4 --batch-size 16 --max-new-tokens 64 \
  --out "$R/ppo_speed_gpu.md" > "$R/ppo_speed.log" 2>&1
echo "rc=$?" >> "$R/ppo_speed.log"

# ---- 3. DeepSpeed ZeRO-2 on CUDA, one process
cat > "$W/z2.yaml" <<YAML
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: recipes/deepspeed/zero2.json
num_processes: 1
num_machines: 1
machine_rank: 0
mixed_precision: bf16
YAML
timeout 150 .venv/bin/accelerate launch --config_file "$W/z2.yaml" -m safealign train-rm --deepspeed recipes/deepspeed/zero2.json \
  --model "$W/policy" --data "$W/world/preferences.jsonl" --output-dir "$W/rm-z2" --dtype bf16 --batch-size 16 --max-steps 20 \
  --max-length 512 --eval-split 0 --save-steps 0 --log-steps 5 > "$R/zero2.log" 2>&1
echo "rc=$?" >> "$R/zero2.log"

# ---- report
"$PY" - "$W" "$R" "$PARAMS" <<'PYEOF'
import json, sys
from pathlib import Path
w, r, params = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3] or 0)
gpu = (r / "gpu.txt").read_text().strip()
PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
peak = next((v for k, v in PEAK.items() if k in gpu), None)
def rep(d):
    f = w / d / "report.json"
    return json.loads(f.read_text()) if f.is_file() else None
lines = ["# GPU check (issue 14)", "", f"Command: `bash bench/gpu_check.sh`; GPU: {gpu}; model: Qwen2.5-0.5B shape, random init, "
         f"{params / 1e6:.0f}M parameters (vocab 151936; the tokenizer is a 1024-token one trained on the synthetic world).", ""]
rm = rep("rm-bf16")
plan = json.loads((r / "plan_train_rm.json").read_text()) if (r / "plan_train_rm.json").is_file() else None
if rm:
    pps, secs = rm["throughput"]["pairs_per_second"], rm["throughput"]["seconds"]
    steps = rm["steps"]
    tokens = None
    m = [json.loads(l) for l in (w / "rm-bf16" / "metrics.jsonl").read_text().splitlines()]
    # tokens per pair from the data (both sides), measured through the stage's tokenizer
    from safealign.models.loading import load_tokenizer
    from safealign.data.records import rows_to_pairs
    from safealign.data.encode import encode_pairs
    tok = load_tokenizer(str(w / "policy"))
    rows = [json.loads(l) for l in (w / "world" / "preferences.jsonl").read_text().splitlines()]
    ex, _ = encode_pairs(tok, rows_to_pairs(rows, task="helpful", source="x")[0], "default", 512)
    tpp = sum(len(e.chosen) + len(e.rejected) for e in ex) / len(ex)
    tps = pps * tpp
    mfu = 6 * params * tps / peak if peak else None
    lines += ["## 1. bf16 train-rm", "", "| pairs/s | tokens/s | MFU | peak GPU memory (MB) | plan's prediction (MB) |", "| --- | --- | --- | --- | --- |",
              f"| {pps:.0f} | {tps:.0f} | {'%.1f%%' % (100 * mfu) if mfu else '?'} | {rm['throughput']['peak_memory_mb']:.0f} | "
              f"{(plan['rows'][0]['peak_nockpt'] / 2**20 if plan and 'rows' in plan else float('nan')):.0f} |", "",
              f"tokens/s = pairs/s x {tpp:.0f} real tokens per pair (padding not counted); MFU = 6 x params x tokens/s / {peak:.3g} FLOP/s." if peak else "", ""]
else:
    lines += ["## 1. bf16 train-rm", "", "FAILED: see bench/results/gpu/train_rm_bf16.log", ""]
lines += ["## 2. ppo-lag, full and LoRA (bench/ppo_speed.py)", ""]
p = r / "ppo_speed_gpu.md"
lines += (p.read_text().splitlines()[2:] if p.is_file() else ["FAILED: see bench/results/gpu/ppo_speed.log"]) + [""]
z2 = rep("rm-z2")
lines += ["## 3. DeepSpeed ZeRO-2 on CUDA", "", (f"finished: {z2['steps']} steps, {z2['throughput']['pairs_per_second']:.0f} pairs/s, peak "
          f"{z2['throughput']['peak_memory_mb']:.0f} MB, distributed {z2['distributed']}" if z2 else "FAILED: see bench/results/gpu/zero2.log"), ""]
if plan:
    lines += ["## 4. plan", "", "`safealign plan --stage train-rm --model <the model> --gpus 1 --gpu-mem 141GB --batch-size 16 --seq-len 512`: "
              "see bench/results/gpu/plan_train_rm.txt; its ZeRO-0 no-offload no-checkpointing row is the prediction quoted in 1.", ""]
(r.parent / "gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
