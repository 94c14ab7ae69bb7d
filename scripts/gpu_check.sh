#!/usr/bin/env bash
# One prepared GPU check (issue 24): run once on a machine with a GPU, no downloads, under 8 minutes on one H200.
# Writes ONE JSON object to ${OUT:-gpu_check_out}/gpu_check.json (and prints it). Parts:
#   train      bf16 training throughput of the real-size dual-stream model (scripts/bench/train.py)
#   ddp        `torchrun --nproc_per_node 1` steps of capret-train on a small rendered garment world (NCCL on
#              a GPU, gloo on a CPU), amp bf16 where CUDA is present
#   extract    extraction images/s, fp32 and bf16 (scripts/bench/extract.py)
#   search     faiss flat and IVF-PQ on the GPU vs the CPU (scripts/bench/search.py's exact part when
#              faiss has no GPU: torch on the GPU still runs as the exact backend)
#   vllm       whether vLLM is there (served-VLM captioning is not measured: see the note at its part)
# Without a GPU every part runs at a small size (the parts that need CUDA say "skipped" and why), so the script
# is checked on CPU machines too: `CAPRET_GPU_CHECK_SMALL=1 bash scripts/gpu_check.sh`.
# Missing Python packages travel as wheels in .whl/ (see the device README); they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CAPRET_NO_PROGRESS=1 MPLBACKEND=Agg
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
gpu=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
small="${CAPRET_GPU_CHECK_SMALL:-$((1 - gpu))}"
parts="$out/parts"
mkdir -p "$parts"

part() {  # part NAME TIMEOUT_S COMMAND...: the command's last stdout line (a JSON object) goes to parts/NAME.json
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  if timeout "$limit" "$@" > "$parts/$name.log" 2> "$parts/$name.err"; then
    tail -n 1 "$parts/$name.log" > "$parts/$name.json"
  else
    local rc=$?
    printf '{"skipped": "exit %s after %ss", "stderr_tail": %s}\n' "$rc" "$((SECONDS - start))" \
      "$(tail -c 400 "$parts/$name.err" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')" \
      > "$parts/$name.json"
  fi
  echo "[$name] $((SECONDS - start)) s" >&2
}

if [ "$small" = 1 ]; then
  part train 300 python3 scripts/bench/train.py --steps 1 --skip-real
  part extract 300 python3 scripts/bench/extract.py --images 16 --batch-size 8 --skip-real
  part search 300 python3 scripts/bench/search.py --skip-exact --n 5000 --dim 32 --shards 2
else
  part train 150 python3 scripts/bench/train.py --steps 10 --gpu-batch-size 128
  part extract 120 python3 scripts/bench/extract.py --images 1024 --batch-size 256
  part search 150 python3 scripts/bench/search.py --n 1000000 --dim 64 --shards 8
fi

# DDP through torchrun on a small rendered world: the real capret-train path (NCCL on GPUs)
world="$out/world"
ddp() {
  python3 -m capret.cli.main data garments --out "$world" --seed 0 --identities 24 --no-progress > /dev/null || return 1
  local amp=off
  [ "$gpu" = 1 ] && amp=bf16
  local start=$SECONDS
  torchrun --standalone --nproc_per_node 1 -m capret.cli.train --config configs/demo_dualstream.yaml \
    data.root="$world/deepfashion2" data.captions=null data.val_captions=null \
    trainer.output_dir="$out/ddp_run" trainer.max_steps=20 \
    trainer.max_seconds=null trainer.amp=$amp trainer.eval_every=0 --no-progress > "$parts/ddp.train.log" 2>&1 \
    || return 1
  python3 - "$out/ddp_run" "$((SECONDS - start))" "$amp" <<'PY'
import json, sys
from pathlib import Path
run, seconds, amp = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
import torch
backend = "nccl" if torch.cuda.is_available() else "gloo"
print(json.dumps({"steps": 20, "wall_seconds_including_start": seconds, "amp": amp, "backend": backend,
                  "checkpoints": sorted(p.name for p in run.rglob("*.safetensors"))[:4]}))
PY
}
export -f ddp
export out world parts gpu
part ddp 240 bash -c ddp

# vLLM: the H200 image has no vllm and its wheels are far over the 64 MiB a call may carry, so the served-VLM
# captioning figure is not measured by this script; say which case this machine is
if python3 -c "import vllm" 2> /dev/null; then
  echo '{"skipped": "vllm imports here, but this script has no served-captioning part yet"}' > "$parts/vllm.json"
else
  echo '{"skipped": "vllm is not installed on this machine (and cannot be carried)"}' > "$parts/vllm.json"
fi

python3 - "$parts" "$out/gpu_check.json" "$gpu" "$small" <<'PY'
import datetime, json, platform, sys
from pathlib import Path
import torch
parts, target, gpu, small = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
result = {
    "date": datetime.date.today().isoformat(),
    "device": torch.cuda.get_device_name(0) if gpu else (platform.processor() or "cpu"),
    "torch": torch.__version__,
    "small": small,
}
for path in sorted(parts.glob("*.json")):
    text = path.read_text().strip()
    try:
        result[path.stem] = json.loads(text)
    except json.JSONDecodeError:
        result[path.stem] = {"skipped": "no JSON line", "output_tail": text[-300:]}
target.write_text(json.dumps(result, indent=1))
print(json.dumps(result))
PY
