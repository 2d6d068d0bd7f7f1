#!/usr/bin/env bash
# Checks that src/gen matches what `buf generate` makes from proto/ now.
# Exits 1 and lists the stale files when it does not.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

output_dir=$(mktemp -d)
trap 'rm -rf "$output_dir"' EXIT

# buf v2 treats -o as the base folder of the plugin outputs in buf.gen.yaml,
# so the fresh code lands in $output_dir/src/gen.
npx buf generate -o "$output_dir"
fresh="$output_dir/src/gen"

if differences=$(diff -rq "$fresh" src/gen); then
  echo "generated code: src/gen matches proto/"
  exit 0
fi

echo "error: src/gen is stale; these files differ from what proto/ generates now:" >&2
while IFS= read -r line; do
  case "$line" in
    "Files $fresh/"*" and src/gen/"*" differ")
      path=${line#"Files $fresh/"}
      echo "  src/gen/${path%% and src/gen/*} (content differs)" >&2
      ;;
    "Only in $fresh"*": "*)
      folder=${line#"Only in $fresh"}
      echo "  src/gen${folder%%: *}/${line##*: } (missing from src/gen)" >&2
      ;;
    "Only in src/gen"*": "*)
      folder=${line#"Only in src/gen"}
      echo "  src/gen${folder%%: *}/${line##*: } (no longer generated from proto/)" >&2
      ;;
    *)
      echo "  $line" >&2
      ;;
  esac
done <<<"$differences"
echo "Run npm run generate and commit the result." >&2
exit 1
