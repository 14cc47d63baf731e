# Sourced by scripts/serve and scripts/test: create or update .venv for this checkout.
# Usage: ensure_venv [EXTRAS]   (re-installs only when pyproject.toml changed)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

pick_python() {
    for py in python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "mrt-serve needs Python 3.11 or 3.12 on PATH" >&2; return 1
}

ensure_venv() {
    local extras="${1:-}"
    local spec="."; [ -n "$extras" ] && spec=".[$extras]"
    local stamp="$VENV/.mrt-installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-${extras:-base}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV"
        "$(pick_python)" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ]; then
        echo "==> installing mrt-serve${extras:+ [$extras]} into .venv (first run takes a few minutes)"
        # grep drops the per-package notes some pip configurations print about local indexes
        "$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; }
        "$VENV/bin/python" -m pip install --quiet -e "$ROOT/$spec" 2>&1 | { grep -v "is ignored: it is neither" || true; }
        "$VENV/bin/python" -c "import serve_app.engine" || { echo "install of mrt-serve failed" >&2; return 1; }
        rm -f "$VENV"/.mrt-installed-*
        touch "$stamp"
    fi
}
