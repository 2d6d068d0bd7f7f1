#!/usr/bin/env bash
# The project's test command. Installs what a fresh Debian 12 machine lacks,
# runs the static checks, builds the daemon and runs the vitest suite, which
# starts its own throwaway etcd and daemon processes on loopback.
# Stops at the first failing step with a non-zero exit code.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
  echo "==> $*"
}

step "installing missing system packages (etcd, protoc, Python gRPC)"
bash scripts/install-system-deps.sh

step "installing npm dependencies (npm ci)"
npm ci --no-audit --no-fund --loglevel=error

step "type-checking sources and tests (npm run typecheck)"
npm run --silent typecheck

step "linting proto files (buf lint)"
npx buf lint

if ! git rev-parse --verify --quiet refs/heads/main >/dev/null 2>&1; then
  step "skipping buf breaking: no local branch named main to compare against"
elif ! git cat-file -e main:proto 2>/dev/null; then
  step "skipping buf breaking: branch main has no proto/ folder yet"
else
  step "checking proto changes against branch main (buf breaking)"
  npx buf breaking --against '.git#branch=main'
fi

step "checking that src/gen matches proto/"
bash scripts/check-generated.sh

step "linting the Dockerfile (npm run lint:docker)"
npm run --silent lint:docker

step "building the daemon into dist/ (npm run build)"
npm run --silent build

step "running the test suite (vitest run)"
report_dir=$(mktemp -d)
trap 'rm -rf "$report_dir"' EXIT
vitest_status=0
npx vitest run --reporter=default --reporter=json --outputFile.json="$report_dir/vitest.json" || vitest_status=$?

# Vitest's own summary ("Tests  12 passed (12)") is printed above. This adds
# the counts as one plain "N passed, N failed" line, which CI reads as the
# closing line of a test run in any language.
if [[ -s "$report_dir/vitest.json" ]]; then
  node -e '
    const report = JSON.parse(require("node:fs").readFileSync(process.argv[1], "utf8"));
    const skipped = report.numPendingTests + report.numTodoTests;
    console.log(`vitest: ${report.numPassedTests} passed, ${report.numFailedTests} failed, ${skipped} skipped`);
  ' "$report_dir/vitest.json"
else
  echo "vitest wrote no JSON report; its output above shows why" >&2
fi
exit "$vitest_status"
