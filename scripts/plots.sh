#!/usr/bin/env bash
# `dvc plots show` / `dvc plots diff` as a self-contained page that renders without internet.
#   bash scripts/plots.sh                 # = dvc plots show       → dvc_plots/index.html
#   bash scripts/plots.sh diff main       # = dvc plots diff main  → dvc_plots/index.html
#   bash scripts/plots.sh show -o out/    # any other `dvc plots` arguments pass through
# DVC's page loads vega, vega-lite and vega-embed from a CDN, so it stays blank on a machine
# without internet (CI, air-gapped servers). This fetches the versions DVC asks for once from
# the npm registry (`npm pack`, integrity-checked by npm) into $VEGA_DIR (default
# <project>/.cache/vega) and inlines them into the page through DVC's --html-template.
# Runs in the current directory's DVC project; needs npm only the first time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VEGA_DIR="${VEGA_DIR:-$ROOT/.cache/vega}"
# The versions dvc-render's page references (dvc_render/vega.py).
PACKAGES=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)

if [ -x "$ROOT/.venv/bin/dvc" ]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
export DVC_NO_ANALYTICS=1

template="$VEGA_DIR/template.html"
if [ ! -s "$template" ]; then
  command -v npm >/dev/null || { echo "scripts/plots.sh: npm is needed once to fetch ${PACKAGES[*]} (apt-get install npm), or use plain 'dvc plots show' with internet" >&2; exit 2; }
  mkdir -p "$VEGA_DIR"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "${PACKAGES[@]}" >/dev/null)
  {
    echo '<!DOCTYPE html>'
    echo '<html>'
    echo '<head>'
    echo '    <meta charset="utf-8">'
    echo '    <title>DVC Plot</title>'
    for pkg in "${PACKAGES[@]}"; do
      name="${pkg%@*}"
      echo "    <script>/* $pkg (BSD-3-Clause), inlined by scripts/plots.sh */"
      tar xzf "$work/$name-${pkg#*@}.tgz" -O "package/build/$name.min.js"
      echo '</script>'
    done
    echo '    <style>table { border-spacing: 15px; }</style>'
    echo '</head>'
    echo '<body>'
    echo '    {plot_divs}'
    echo '</body>'
    echo '</html>'
  } > "$work/template.html"
  mv "$work/template.html" "$template"
fi

cmd="${1:-show}"
[ $# -gt 0 ] && shift
dvc plots "$cmd" --html-template "$template" "$@"
