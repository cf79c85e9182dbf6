#!/usr/bin/env bash
# Opens an HTML audit report in headless Chromium with every network request refused, checks that
# the page parsed whole (the verdict and as many plots as the file holds), and writes a screenshot.
# Usage: compat/html_check.sh REPORT.html [SHOT.png]
# Needs the Debian package `chromium` (installed here with apt-get when missing and run as root).
set -euo pipefail
report=$(realpath "$1")
shot=${2:-${report%.html}.png}
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
    else
        echo "chromium is not installed (Debian: apt-get install chromium)" >&2
        exit 2
    fi
fi
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --host-resolver-rules="MAP * ~NOTFOUND" --proxy-server="127.0.0.1:9")
dom=$(mktemp)
chromium "${flags[@]}" --dump-dom "file://$report" > "$dom" 2>/dev/null
svgs_file=$(grep -o "<svg" "$report" | wc -l)
svgs_dom=$(grep -o "<svg" "$dom" | wc -l)
verdict=$(grep -o 'class="verdict [a-z]*">[A-Z]*' "$dom" | sed 's/.*>//' || true)
external=$( (grep -Eoi '(src|href)="(https?:)?//' "$report" || true) | wc -l)
chromium "${flags[@]}" --window-size=1200,1700 --screenshot="$shot" "file://$report" >/dev/null 2>&1
echo "report: $report ($(wc -c < "$report") bytes)"
echo "chromium: $(chromium --version 2>/dev/null)"
echo "verdict rendered: ${verdict:-none}; plots: $svgs_dom rendered of $svgs_file in the file; external references: $external"
echo "screenshot: $shot ($(wc -c < "$shot") bytes)"
rm -f "$dom"
[ -n "$verdict" ] && [ "$svgs_dom" = "$svgs_file" ] && [ "$external" = 0 ]
