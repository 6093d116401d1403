#!/usr/bin/env bash
# Kept in the repo (benchmarks/gpu_check.sh): after `bash ../shared/gpu/prepare.sh`, copy it over .gpu/check.sh and run
# `bash .gpu/check.sh $OUT` on the GPU machine with .gpu carried. Runs under 7 steps need --generation_cache static
# explicitly (auto compiles only for runs of >= 20 steps).
# Issue 12 item 4 on the GPU: static cache + compiled decoding (the CUDA default now) and merged-LoRA generation,
# against TRL GRPOTrainer and our dynamic-cache path at equal settings; then the non-vLLM suite on CUDA.
W=$(mktemp -d)
LOG=${1:-$W/logs}; mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $W/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=$W/site:$PWD
export OPEN_INSTRUCT2_CACHE=$W/cache
M=$W/cache/models/smollm2-135m-instruct-v1
nvidia-smi -L
python3 -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
python3 .gpu/make_random.py .gpu/tok $M || exit 4
summ() {  # per-step times of one of our runs and the median of steps 2..n
python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if "time/step" in r]
for r in rows:
    print(f"  step {r.get('step', '?')}: step {r['time/step']:.2f} s, rollout {r['time/rollout']:.2f} s, update {r['time/update']:.2f} s, gen {r.get('rollout/tokens_per_second', 0):.0f} tok/s")
later = rows[1:] or rows
med = lambda k: statistics.median(r[k] for r in later)
print(f"  OURS_RESULT median steps 2..{len(rows)}: step {med('time/step'):.2f} s, rollout {med('time/rollout'):.2f} s, update {med('time/update'):.2f} s, gen {med('rollout/tokens_per_second'):.0f} tok/s")
PY
}
COMMON="--runtime_target linux_gpu --num_unique_prompts_rollout 16 --num_samples_per_prompt_rollout 8 --response_length 256 --beta 0 --reference_mode none --per_device_train_batch_size 32 --learning_rate 1e-6 --verifier_module .gpu/even_length_verifier.py --remap_verifier gsm8k=even_length --gradient_checkpointing false --output_dir $W/ours --log_samples_freq 100 --num_evals 0"
echo "=== ours, full, 16x8x256 bf16 beta 0, --generation_cache static (compiled decoding)"
timeout 200 python3 -m open_instruct2.train_grpo $COMMON --num_training_steps 7 --generation_cache static --run_name full 2>&1 | grep -E "HF generate|step [0-9]+/|Error|error|Traceback|recompil" | tail -14
summ $W/ours/full/metrics.jsonl; cp $W/ours/full/metrics.jsonl $LOG/ours_full_static.jsonl 2>/dev/null
echo "=== TRL GRPOTrainer, same settings"
(cd $W && timeout 130 python3 $OLDPWD/.gpu/trl_side.py --model $M --steps 5 --prompts 16 --gens 8 --length 256 --micro 32 > $LOG/trl.log 2>&1); grep TRL_RESULT $LOG/trl.log || tail -5 $LOG/trl.log
echo "=== ours, full, --generation_cache dynamic (the path before)"
timeout 90 python3 -m open_instruct2.train_grpo $COMMON --num_training_steps 4 --generation_cache dynamic --run_name dyn 2>&1 | grep -E "HF generate|Error|Traceback" | tail -4
summ $W/ours/dyn/metrics.jsonl
echo "=== ours, LoRA, lora_generation auto (merged copy), static + compiled"
timeout 150 python3 -m open_instruct2.train_grpo $COMMON --num_training_steps 6 --generation_cache static --train_mode lora --learning_rate 1e-4 --num_evals 2 --run_name lora 2>&1 | grep -E "HF generate|LoRA generation|Error|error|Traceback" | tail -6
summ $W/ours/lora/metrics.jsonl; cp $W/ours/lora/metrics.jsonl $LOG/ours_lora.jsonl 2>/dev/null
echo "=== tests (not vllm) on CUDA"
timeout 150 python3 -m pytest -q -m "not vllm" -p no:cacheprovider --timeout 60 --ignore tests/test_bootstrap.py tests -k "not smoke_test_on_builtin" -rf 2>&1 | tee $LOG/pytest.log | tail -25
