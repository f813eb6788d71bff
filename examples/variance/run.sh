#!/usr/bin/env bash
# The variance study in one command: runs every cell once (cached in .stacklock/matrix, so a re-run only
# renders), then writes the report as markdown, HTML and JSON next to this script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
stacklock="${STACKLOCK:-stacklock}"
"$stacklock" matrix run "$here/matrix.toml" --jobs "${JOBS:-1}" --format markdown -o "$here/report.md"
"$stacklock" matrix run "$here/matrix.toml" --format html -o "$here/report.html"
"$stacklock" matrix run "$here/matrix.toml" --format json -o "$here/report.json"
