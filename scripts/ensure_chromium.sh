#!/usr/bin/env bash
# The browser that tests/e2e/test_translate.py drives through Playwright: Debian's chromium (Playwright's own
# browser download cannot work offline). Installed once per machine where apt-get can (root); elsewhere the one
# browser test is skipped, and this says why. Never fails the build by itself.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the caption-page test (once per machine)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1 \
      || echo "could not install chromium: the caption-page test will be skipped" >&2
  fi
else
  echo "chromium is not installed and apt-get needs root: the caption-page test will be skipped" >&2
fi
exit 0
