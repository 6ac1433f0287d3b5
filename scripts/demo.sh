#!/usr/bin/env bash
# The main job (`make demo`): M3AE vs MAE on the embedded dataset over three seeds, with the
# random-init and supervised reference rows (m3ae demo), then the paper's figures (reconstructions,
# attention maps) and an HTML report drawn from the demo's seed-0 M3AE model: no second pretraining.
set -euo pipefail
BIN=${1:-.venv/bin}
DEMO=${DEMO:-runs/demo}

"$BIN/m3ae" demo --out-dir "$DEMO" ${DEMO_ARGS:-}
RUN="$DEMO/m3ae/seed0"
CKPT=$(ls -d "$RUN"/checkpoints/step_* | sort | tail -n 1)

# two held-out samples of the embedded dataset, as files a user would bring
SAMPLES="$RUN/samples"
mkdir -p "$SAMPLES"
tar -xf data/embedded/val-0000.tar -C "$SAMPLES" 100000000.jpg 100000000.txt 100000001.jpg 100000001.txt
"$BIN/m3ae" reconstruct --checkpoint "$CKPT" --tokenizer m3ae-embedded --image "$SAMPLES"/100000000.jpg "$SAMPLES"/100000001.jpg \
    --caption "$(head -n 1 "$SAMPLES"/100000000.txt)" "$(head -n 1 "$SAMPLES"/100000001.txt)" \
    --out "$RUN/figures/reconstruct_samples.png"
"$BIN/m3ae" attention --checkpoint "$CKPT" --tokenizer m3ae-embedded --image "$SAMPLES"/100000000.jpg \
    --caption "$(head -n 1 "$SAMPLES"/100000000.txt)" --layer mean --out "$RUN/figures/attention"
"$BIN/m3ae" report --run-dir "$RUN"
