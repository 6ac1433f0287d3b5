#!/usr/bin/env bash
# The main job (`make demo`): pretrain the tiny M3AE on the embedded dataset, draw the paper's figures
# from it (reconstructions, attention maps) and an HTML report of the run, then compare M3AE with MAE
# (equal steps and batch, linear probe + kNN on held-out labels, image grounding of the words).
set -euo pipefail
BIN=${1:-.venv/bin}
RUN=${RUN:-runs/quickstart}
DEMO=${DEMO:-runs/demo}

"$BIN/m3ae" pretrain --out-dir "$RUN" --resume auto
CKPT=$(ls -d "$RUN"/checkpoints/step_* | sort | tail -n 1)

# two held-out samples of the embedded dataset, as files a user would bring
SAMPLES="$RUN/samples"
mkdir -p "$SAMPLES"
tar -xf data/embedded/val-0000.tar -C "$SAMPLES" 100000000.jpg 100000000.txt 100000001.jpg 100000001.txt
"$BIN/m3ae" reconstruct "$CKPT" --images "$SAMPLES"/100000000.jpg "$SAMPLES"/100000001.jpg \
    --captions "$(head -n 1 "$SAMPLES"/100000000.txt)" "$(head -n 1 "$SAMPLES"/100000001.txt)" \
    --out "$RUN/figures/reconstruct_samples.png"
"$BIN/m3ae" attention "$CKPT" --image "$SAMPLES"/100000000.jpg --caption "$(head -n 1 "$SAMPLES"/100000000.txt)" \
    --layer mean --out-prefix "$RUN/figures/attention"
"$BIN/m3ae" report "$RUN"
"$BIN/m3ae" demo --out-dir "$DEMO"
