#!/usr/bin/env bash
# gpu_session.sh PHASE|STEP... - the GPU measurements of issues 21-23 and 27, planned as four device calls of at
# most 10 minutes each (the device tool's limit), each step in its own process under its own time limit, so that a
# hung step costs only its own slot. Every step's whole log goes to $OUT/<step>.log and its JSON to $OUT; a short tail is printed.
#
#   bash bench/gpu_session.sh 1   0.5B GRPO end to end with vLLM (sleep, CUDA IPC sync, the standalone-vLLM ceiling,
#                                 the HF engine vs plain generate) -> gpu_ppo_05b.json; then the gpu-marked vLLM tests
#   bash bench/gpu_session.sh 2   update throughput/MFU at 0.5B and 1.5B, packed token budget vs padded, with a profile;
#                                 then every gpu-marked test
#   bash bench/gpu_session.sh 3   1.5B PPO with a critic end to end -> gpu_ppo_15b.json; 0.5B without sleep (peak)
#   bash bench/gpu_session.sh 4   LoRA vs full at 0.5B (bench/lora.py --gpu); 0.5B with CUDA graphs off (enforce_eager)
#   bash bench/gpu_session.sh gpu_ppo_05b_standard   the 0.5B run with placement standard (engine beside, not in, the
#                                 policy's bundle; the sync's route as weight_route picks it)
#   bash bench/gpu_session.sh async_gpu  S = 0 and 1 on one GPU's fractions (bench/async.py --device gpu --gpus 1)
#   bash bench/gpu_session.sh train_compile  update MFU at 0.5B and 1.5B, packed token budget, with policy.compile
#                                 (torch.compile) -> train_compile.json; its eager rows are train_throughput's
#   CARRY=.carry-trl bash bench/gpu_session.sh trl_gpu   ppoflow's GRPO and TRL's GRPOTrainer with vLLM colocate on
#                                 the same 0.5B shape, prompts and lengths (bench/trl_gpu.py) -> trl_gpu.json; needs
#                                 the archive of WITH_TRL=1 bash gpu/pack.sh .carry-trl (carried as .carry-trl/)
#   bash bench/gpu_session.sh STEP...   named steps (see run_step), to fit what a call has left
#
# Needs .carry/ (bash gpu/pack.sh) beside the repo; see bench/gpu_run.sh. Results are copied into bench/RESULTS.md
# and bench/results/*.json by hand (with the machine and date), then bench/checkpoint.py --gpu-json derives the
# checkpoint shares.
set -uo pipefail
cd "$(dirname "$0")/.."
source gpu/env.sh || exit 1
export OUT=${OUT:-${TMPDIR:-/tmp}/ppoflow-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step() {  # step NAME SECONDS COMMAND...: run it under its limit, log to $OUT/NAME.log, print the verdict and a tail
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name rc=$rc after $((SECONDS - t0)) s"
    grep -v -E "^\s*$|Warning|warn\(" "$OUT/$name.log" | tail -n "${TAIL:-30}"
    ray stop --force >/dev/null 2>&1 || python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
    pkill -f "vllm|ray::" >/dev/null 2>&1
    return 0
}

run_step() {  # one named measurement under its own limit
    case $1 in
    gpu_ppo_05b) step gpu_ppo_05b 400 python3 bench/gpu_ppo.py --shape qwen2.5-0.5b --iterations 3 --prompts 64 \
        --samples 8 --max-new-tokens 256 --set algo.estimator=group_norm --hf-generate --json-name gpu_ppo_05b.json ;;
    vllm_tests) step vllm_tests 170 python3 -m pytest -q -x -m gpu tests/flows/test_vllm_gpu.py -p no:cacheprovider ;;
    train_throughput) TAIL=40 step train_throughput 270 python3 bench/train_throughput.py \
        --shape qwen2.5-0.5b,qwen2.5-1.5b --mode packed-budget,padded --role policy --profile ;;
    train_compile) TAIL=40 step train_compile 270 python3 bench/train_throughput.py \
        --shape qwen2.5-0.5b,qwen2.5-1.5b --mode packed-budget --role policy --compile on \
        --json "$OUT/train_compile.json" ;;
    gpu_tests) step gpu_tests 260 python3 -m pytest -v -m gpu tests/flows/test_vllm_gpu.py \
        tests/workers/test_hf_engine.py tests/flows/test_engine_group_flow.py -p no:cacheprovider --durations=10 ;;
    gpu_ppo_15b) step gpu_ppo_15b 330 python3 bench/gpu_ppo.py --shape qwen2.5-1.5b --iterations 3 --prompts 64 \
        --samples 8 --max-new-tokens 256 --no-standalone --json-name gpu_ppo_15b.json ;;
    gpu_ppo_15b_offload) step gpu_ppo_15b_offload 400 python3 bench/gpu_ppo.py --shape qwen2.5-1.5b --iterations 3 \
        --prompts 64 --samples 8 --max-new-tokens 256 --offload optimizer --no-standalone \
        --json-name gpu_ppo_15b_offload.json ;;  # an H100: the Adam states in host memory leave vLLM its share
    gpu_ppo_05b_nosleep) step gpu_ppo_05b_nosleep 230 python3 bench/gpu_ppo.py --shape qwen2.5-0.5b --iterations 2 \
        --prompts 64 --samples 8 --max-new-tokens 256 --set algo.estimator=group_norm --no-sleep --no-standalone \
        --json-name gpu_ppo_05b_nosleep.json ;;
    lora_gpu) step lora_gpu 380 python3 bench/lora.py --gpu --iterations 3 --workdir /tmp/ppoflow-lora \
        --json "$OUT/lora-gpu.json" ;;
    gpu_ppo_05b_eager) step gpu_ppo_05b_eager 200 python3 bench/gpu_ppo.py --shape qwen2.5-0.5b --iterations 2 \
        --prompts 64 --samples 8 --max-new-tokens 256 --set algo.estimator=group_norm \
        --set generation.enforce_eager=true --no-standalone --json-name gpu_ppo_05b_eager.json ;;
    gpu_ppo_05b_standard) step gpu_ppo_05b_standard 200 python3 bench/gpu_ppo.py --shape qwen2.5-0.5b --iterations 2 \
        --prompts 64 --samples 8 --max-new-tokens 256 --set algo.estimator=group_norm \
        --set generation.placement=standard --no-standalone --json-name gpu_ppo_05b_standard.json ;;
    async_gpu) cp bench/results/async.json "$OUT/async.json"  # updated under "gpu", the CPU numbers kept
        step async_gpu 450 python3 bench/async.py --device gpu --gpus 1 --staleness 0 1 --workdir /tmp/ppoflow-async \
        --out "$OUT/async.json" ;;
    # ppoflow ~220 s (4 iterations, actors' start-up ~90 s) then TRL ~180 s (vLLM's compile and CUDA graphs, 3
    # iterations); each side has its own limit inside (260 s, 250 s; 20 s at most for the GPU to empty between).
    trl_gpu) TAIL=45 step trl_gpu 550 python3 bench/trl_gpu.py --json "$OUT/trl_gpu.json" ;;
    *) echo "unknown step $1" >&2 ;;
    esac
}

# A phase fits one 10-minute call; steps may also be named one by one (bash bench/gpu_session.sh lora_gpu ...).
for arg in "${@:?phase 1, 2, 3 or 4, or step names}"; do
    case $arg in
    1) steps="gpu_ppo_05b vllm_tests" ;;
    2) steps="train_throughput gpu_tests" ;;
    3) steps="gpu_ppo_15b gpu_ppo_05b_nosleep" ;;
    4) steps="lora_gpu gpu_ppo_05b_eager" ;;
    *) steps=$arg ;;
    esac
    for s in $steps; do run_step "$s"; done
done
