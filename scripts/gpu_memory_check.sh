#!/usr/bin/env bash
# The memory tier on a real GPU, with the GPT recipe (medium: ~126M parameters, ~1.5 GB of
# state per snapshot): a snapshot every step, a durable checkpoint every 20.
#
#   1. a fault-free run: final weights A, and the stall per step from its progress lines;
#   2. the same run SIGKILLed after step 30, then started again: it must restore from memory
#      and end with final weights bitwise equal to A;
#   3. restore times of one snapshot: from memory and from the durable (DCP) checkpoint.
#
# Run from the repository root on a machine with CUDA and torch (scripts/gpu_check.sh covers
# the node health checks). Needs pydantic and xxhash importable; prints what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
W=${IRONPOD_GPU_WORK:-/tmp/ironpod-gpu-memory}
CONFIG=${CONFIG:-medium}
STEPS=${STEPS:-50}
KILL_AT=${KILL_AT:-30}
rm -rf "$W" /dev/shm/ironpod-gpu-check
mkdir -p "$W"
export IRONPOD_CACHE_DIR="$W/cache" IRONPOD_SNAPSHOT_DIR=/dev/shm/ironpod-gpu-check/job-1
SETS=(--set "train.steps=$STEPS" --set checkpoint.memory_every=1 --set checkpoint.every=20
      --set train.eval_every=1000 --set train.deterministic=true --set train.compile=false
      --set train.log_every=1 --set data.max_bytes=20000000)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== 0. data (tokenizer trained and corpus cached once, outside the timed runs)"
python3 -c "import sys; from recipes.gpt import data; from recipes.gpt.config import load_config; \
data.prepare(load_config(sys.argv[1], sys.argv[2:]).data)" "$CONFIG" data.max_bytes=20000000

echo "== 1. fault-free run ($CONFIG, $STEPS steps, snapshot every step)"
python3 -m recipes.gpt.train --config "$CONFIG" "${SETS[@]}" \
  --set "checkpoint.dir=$W/ckpt-a" --final-weights "$W/final-a.pt" > "$W/a.log" 2>&1
grep -E "^\[gpt\]" "$W/a.log" | tail -3
rm -rf /dev/shm/ironpod-gpu-check

echo "== 2. SIGKILL after step $KILL_AT, then resume"
python3 -m recipes.gpt.train --config "$CONFIG" "${SETS[@]}" \
  --set "checkpoint.dir=$W/ckpt-b" --final-weights "$W/final-b.pt" > "$W/b1.log" 2>&1 &
pid=$!
until grep -q "step=$KILL_AT " "$W/b1.log" 2>/dev/null; do
  kill -0 "$pid" 2>/dev/null || { echo "run exited early"; tail -20 "$W/b1.log"; exit 1; }
  sleep 0.2
done
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
python3 -m recipes.gpt.train --config "$CONFIG" "${SETS[@]}" \
  --set "checkpoint.dir=$W/ckpt-b" --final-weights "$W/final-b.pt" > "$W/b2.log" 2>&1
grep -E "restored|resuming" "$W/b2.log" | head -3

python3 - "$W" "$CONFIG" <<'EOF'
import statistics, sys, torch
from pathlib import Path
from ironpod.train.beacon import parse_progress_line
from recipes.gpt.config import load_config
w = Path(sys.argv[1])
cfg = load_config(sys.argv[2], [])
tokens = cfg.train.global_batch * cfg.data.seq_len
a, b = torch.load(w / "final-a.pt", weights_only=True), torch.load(w / "final-b.pt", weights_only=True)
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print(f"final weights after kill + resume bitwise equal: {same}")
rows = [parse_progress_line(l) for l in (w / "a.log").read_text().splitlines()]
rows = [r for r in rows if r and "ckpt_mem_block_s" in r and r["step"] > 5]
step = statistics.median(tokens / r["tok_s"] for r in rows)
mem = [r["ckpt_mem_block_s"] for r in rows]
blk = [r["ckpt_block_s"] for r in rows]
print(f"snapshot bytes per step: {rows[-1].get('ckpt_snapshot_bytes', 0) / 1e9:.2f} GB")
print(f"step {step * 1e3:.1f} ms (median); memory snapshot stall per step: median "
      f"{statistics.median(mem) * 1e3:.1f} ms = {statistics.median(mem) / step:.1%} of a step, "
      f"max {max(mem) * 1e3:.1f} ms; all checkpoint stall median {statistics.median(blk) * 1e3:.1f} ms")
EOF

echo "== 3. restore times (one snapshot: memory vs durable)"
python3 - "$CONFIG" <<'EOF'
import shutil, sys, tempfile, time
from pathlib import Path
import torch
import ironpod.train as it
from ironpod.train.checkpoint.memory import MemorySnapshots
from recipes.gpt.config import load_config
from recipes.gpt.model import Transformer, cross_entropy
cfg = load_config(sys.argv[1], ["train.compile=false"])
model = Transformer(cfg.model, seed=0).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
tok = torch.randint(cfg.model.vocab_size, (2, 257), device="cuda")
cross_entropy(model(tok[:, :-1]), tok[:, 1:]).backward(); opt.step(); torch.cuda.synchronize()
state = it.TrainState(model=model, optimizer=opt)
area = Path(tempfile.mkdtemp(dir="/dev/shm")) / "job-1"
disk = Path(tempfile.mkdtemp())
mem = MemorySnapshots(area, slots=2)
stalls = []
for step in range(1, 6):
    stalls.append(mem.snapshot(step, state)); mem.wait()
durable = it.Checkpointer(str(disk), asynchronous=False)
durable.save(5, state)
print(f"snapshot stall (blocking copy GPU->host), min of 5: {min(stalls) * 1e3:.1f} ms; "
      f"background write: {min(r.write_s for r in mem.history) * 1e3:.1f} ms")
best = {}
for _ in range(3):
    for name, load in (("memory", lambda: mem.load(5, state)), ("disk", lambda: durable.load_latest(state))):
        torch.cuda.synchronize(); t = time.perf_counter(); load(); torch.cuda.synchronize()
        best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
print(f"restore: memory {best['memory'] * 1e3:.1f} ms, disk (page cache) {best['disk'] * 1e3:.1f} ms, "
      f"ratio {best['disk'] / best['memory']:.1f}x")
mem.close(); durable.close()
shutil.rmtree(area.parent, ignore_errors=True); shutil.rmtree(disk, ignore_errors=True)
EOF
