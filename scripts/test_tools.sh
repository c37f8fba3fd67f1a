#!/usr/bin/env bash
# Tools the tests use as independent references, outside Python (best effort: a test whose tool is
# missing is skipped and says why).
#  - @playcanvas/splat-transform (npm) into .ci/node_modules: reads our .ply/.splat/.spz.
#  - Debian's chromium: opens the viewer page headless.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .ci/node_modules/.bin/splat-transform ] && command -v npm >/dev/null; then
  (cd .ci && npm install --silent --no-audit --no-fund --no-save --prefix . @playcanvas/splat-transform@3.7.0 >/dev/null 2>&1) \
    || echo "warning: npm install @playcanvas/splat-transform failed; its tests will be skipped" >&2
fi
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
    || echo "warning: apt-get install chromium failed; the viewer screenshot test will be skipped" >&2
fi
exit 0
