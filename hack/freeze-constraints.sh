#!/usr/bin/env bash
# Regenerate constraints.txt (the pinned versions every install uses) from a working virtualenv.
#   bash hack/freeze-constraints.sh [path/to/venv]     (default: .venv)
# Update on purpose: upgrade in the venv (pip install -U torch ...), run `make test` there, then run this
# and commit constraints.txt with the test result. pyproject.toml keeps its loose ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
{
  echo "# Pinned versions for reproducible installs (hack/install.sh, .ci/run via make, docker/): pip -c constraints.txt."
  echo "# Regenerate with hack/freeze-constraints.sh after running the suite on the new set; see README (Reproducible installs)."
  "$VENV/bin/pip" freeze --exclude-editable --all | grep -v -i -E '^(kubeinfer|pip|setuptools|wheel)(==| @)' | sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
# A hand-fixed venv can hold a set pip would never resolve (lm-eval's pytablewriter wants python-dateutil<3,
# kubernetes>=37 wants >=3): check that a fresh install resolves with these pins before committing them.
"$VENV/bin/pip" install --quiet --dry-run --ignore-installed -c constraints.txt -e ".[dev]" \
  || { echo "constraints.txt does not resolve for a fresh install: fix the conflicting pins" >&2; exit 1; }
