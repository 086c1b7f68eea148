#!/usr/bin/env bash
# Create a separate virtual environment holding the peer SAE libraries that
# benchmarks/compare_peers.py compares saelab against. It lives OUTSIDE the repo.
#
#   bash benchmarks/peers/setup_peers.sh [VENV_DIR]      (default /work/peer-venv)
#
# Tested with (2026-11): torch 2.13.0+cpu, eai-sparsify 1.3.3, sae-lens 6.54.12,
# dictionary-learning 0.1.0 (it pulls nnsight 0.3.x, which pulls torchvision), Python 3.11.
#
# Order matters (GUIDE §7): torch first (the CPU wheel; an unpinned torch pulls a CUDA build),
# then the peers, then remove the torchvision that nnsight (a dictionary-learning dependency)
# pulls in: with it installed, none of the peers imports ("operator torchvision::nms does not
# exist"). Each peer is installed on its own so one failing does not stop the others;
# compare_peers.py reports a peer that does not import as "not available".
set -u
VENV="${1:-/work/peer-venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

TORCH_VERSION="2.13.0"
SPARSIFY_VERSION="1.3.3"      # PyPI eai-sparsify (EleutherAI/sparsify)
SAELENS_VERSION="6.54.12"     # PyPI sae-lens (decoderesearch/SAELens)
DICTLEARN_VERSION="0.1.0"     # PyPI dictionary-learning (saprmarks/dictionary_learning)

"$PY" -m venv "$VENV" || exit 1
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip >/dev/null 2>&1 || true
"$PIP" install "torch==$TORCH_VERSION" "numpy" || { echo "torch install failed" >&2; exit 1; }

status=0
for spec in "eai-sparsify==$SPARSIFY_VERSION" "sae-lens==$SAELENS_VERSION" "dictionary-learning==$DICTLEARN_VERSION"; do
    # Repeating the torch pin keeps the CPU wheel installed above.
    if ! "$PIP" install "$spec" "torch==$TORCH_VERSION"; then
        echo "WARNING: $spec failed to install; the comparison will list it as unavailable" >&2
        status=1
    fi
done
"$PIP" uninstall -y torchvision || true

# Record what was installed in $VENV/peer-versions.txt (compare_peers.py also prints the versions
# it finds at run time).
"$VENV/bin/python" - <<'PY' | tee "$VENV/peer-versions.txt"
import importlib, importlib.metadata as md
for dist, mod in [("torch", "torch"), ("eai-sparsify", "sparsify"), ("sae-lens", "sae_lens"),
                  ("dictionary-learning", "dictionary_learning")]:
    try:
        v = md.version(dist)
    except md.PackageNotFoundError:
        print(f"{dist}: not installed"); continue
    try:
        importlib.import_module(mod); ok = "imports"
    except Exception as e:  # noqa: BLE001
        ok = f"does NOT import: {type(e).__name__}: {e}"
    print(f"{dist}=={v}: {ok}")
PY
exit $status
