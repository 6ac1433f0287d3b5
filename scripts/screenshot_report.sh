#!/usr/bin/env bash
# Renders a run's report.html in headless Chromium (Debian package `chromium`) and saves a screenshot:
#   scripts/screenshot_report.sh RUN_DIR [OUT.png]
set -euo pipefail
RUN=$1
OUT=${2:-$RUN/report.png}
PROFILE=$(mktemp -d)
trap 'rm -rf "$PROFILE"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --user-data-dir="$PROFILE" --window-size=1200,2400 \
    --screenshot="$OUT" "file://$(realpath "$RUN/report.html")" 2>/dev/null
echo "wrote $OUT"
