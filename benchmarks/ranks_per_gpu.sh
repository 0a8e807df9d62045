#!/usr/bin/env bash
# End-to-end img/s with K worker processes sharing one GPU (one GIL each), dynamic shard assignment.
# Needs the images and model that `python -m benchmarks.gpu_throughput --workdir $1` made.
# Usage: bash benchmarks/ranks_per_gpu.sh /tmp/bench "1 2 3"
set -euo pipefail
work=${1:-/tmp/bench}
for k in ${2:-1 2 3}; do
  out="$work/out-ranks$k"
  rm -rf "$out"
  OMP_NUM_THREADS=4 python3 -m torch.distributed.run --standalone --nproc_per_node="$k" -m worker \
    --input "$work/images" --output "$out" --model "$work/vit-base-patch16-224-random" \
    --batch-size 256 --shard-size 512 --assignment dynamic --log-interval 60 > "$out.log" 2>&1
  python3 - "$out" "$k" <<'PY'
import json, sys, pathlib
out, k = pathlib.Path(sys.argv[1]), sys.argv[2]
s = [json.loads(p.read_text()) for p in (out / "summary").glob("rank-*.json")]
images = sum(x["images"] for x in s); wall = max(x["seconds"] for x in s)
print(f"{k} ranks on one GPU: {images} images, {images / wall:,.0f} img/s "
      f"(slowest rank {wall:.2f}s, fastest {min(x['seconds'] for x in s):.2f}s)")
PY
done
