#!/usr/bin/env bash
# Try saelab as a new user would: clone the repository alone into an empty temporary folder (nothing
# beside it), run the README's setup, a small-budget quickstart, and check its report and metrics.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/saelab"
cd "$work/saelab"
./setup.sh
# 65,536 tokens: harvest, train (16 steps of 4,096) and evaluate in a few minutes on 2 cores.
.venv/bin/saelab quickstart --n-tokens 65536 --eval-recon-tokens 8192 --eval-downstream-tokens 2048 --no-progress \
    > quickstart.txt
.venv/bin/python - <<'PY'
import json, math, pathlib
run = pathlib.Path("runs/quickstart")
metrics = json.loads((run / "metrics.json").read_text())
bad = [k for k in ("nmse", "l0", "delta_ce", "kl", "ce_clean", "ce_spliced") if not math.isfinite(metrics[k])]
assert not bad, f"non-finite metrics: {bad}"
report = (run / "report.md").read_text()
assert "nMSE" in report and (run / "sae" / "sae_weights.safetensors").is_file()
print(f"newcomer quickstart ok: nMSE {metrics['nmse']:.4f}, L0 {metrics['l0']:.1f}, delta CE {metrics['delta_ce']:.4f}, "
      f"wall {metrics['wall_seconds']['total']} s")
PY
