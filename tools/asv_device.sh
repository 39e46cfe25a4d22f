#!/usr/bin/env bash
# The asv suite on the GPU machine, in one device call, for every commit that
# tools/asv_prepare.py planned (HEAD's working tree, then backfilled source trees).
#   here:    python tools/asv_prepare.py --backfill HASH[:IMPLS] ...
#   device:  bash tools/asv_device.sh            (carry: .whl .asv .git-commit)
#   here:    python asv_bench/collect.py FILES_AT
# Results go to $OUT/asv/results (asv's layout, merged into asv_bench/results by
# collect.py), logs to $OUT/asv/*.log; a short table of HEAD's results is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/.out}
mkdir -p "$OUT/asv"
[ -f .asv/plan.txt ] || { echo "no .asv/plan.txt: run tools/asv_prepare.py first"; exit 2; }

site=/tmp/asv-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" .whl/*.whl || exit 2
# asv asks git for hashes and dates; the machine has the tree but no .git.
mkdir -p /tmp/asv-bin /tmp/asv-repo/objects
printf '#!/bin/sh\nexec python3 %s/tools/asv_git.py "$@"\n' "$ROOT" > /tmp/asv-bin/git
chmod +x /tmp/asv-bin/git
export PATH=/tmp/asv-bin:$PATH PYTHONUNBUFFERED=1

gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)
machine=$(echo "${gpu%%,*}" | tr 'A-Z ' 'a-z-')
soft=$(python3 -c "import cupy, torch, sys; print(f'CuPy {cupy.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}')" 2>/dev/null)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
ram=$(awk '/MemTotal/ {print $2 * 1024}' /proc/meminfo)
echo "machine $machine: $gpu; $soft" | tee "$OUT/asv/device.txt"

# A config of this run: the suite of this tree, the stand-in repository, results to $OUT.
python3 - "$ROOT" "$OUT/asv" <<'EOF'
import json, pathlib, sys
sys.path.insert(0, "/tmp/asv-site")
import json5
root, out = map(pathlib.Path, sys.argv[1:])
conf = json5.loads((root / "asv_bench" / "asv.conf.json").read_text())
conf.update(repo="/tmp/asv-repo", benchmark_dir=str(root / "asv_bench" / "benchmarks"),
            results_dir=str(out / "results"), html_dir=str(out / "html"))
(out / "asv.conf.json").write_text(json.dumps(conf, indent=1))
EOF
asv() { PYTHONPATH=$site python3 -m asv "$@" --config "$OUT/asv/asv.conf.json"; }
asv machine --yes --machine "$machine" --os "$(uname -sr)" --arch "$(uname -m)" \
  --cpu "$gpu; $soft; host $cpu" --num_cpu "$(nproc)" --ram "$ram" > /dev/null

while read -r hash tree impls bench; do
  [ -n "$hash" ] || continue
  [ "$impls" = all ] && unset CUFLASH_ASV_IMPLS || export CUFLASH_ASV_IMPLS=$impls
  echo "== ${hash:0:8} ($tree, $impls${bench:+, -b $bench})"
  t0=$(date +%s)
  # The benchmarks import cuflash from the commit's tree; asv passes ASV_PYTHONPATH on.
  ASV_PYTHONPATH="$ROOT/$tree:$site" asv run --python=same --set-commit-hash "$hash" \
    --machine "$machine" --show-stderr ${bench:+-b "$bench"} > "$OUT/asv/run-${hash:0:8}.log" 2>&1
  echo "   rc=$? in $(( $(date +%s) - t0 )) s; $(grep -c 'failed' "$OUT/asv/run-${hash:0:8}.log") lines say failed"
done < .asv/plan.txt

echo
echo "================ summary (HEAD) ================"
head_hash=$(head -n 1 .asv/plan.txt | cut -d' ' -f1)  # HEAD, or the first backfill
PYTHONPATH=$ROOT python3 asv_bench/report.py "$OUT/asv/results" --machine "$machine" \
  --commit "$head_hash" | tee "$OUT/asv/report-head.txt"
# The result files sit three folders deep, deeper than the device tool brings back.
tar -czf "$OUT/asv-results.tgz" -C "$OUT/asv" results
exit 0
