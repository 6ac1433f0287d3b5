#!/usr/bin/env bash
set -euo pipefail
BIN=${1:-.venv/bin}
echo "main job: not wired yet"
