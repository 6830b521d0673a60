#!/usr/bin/env bash
# Vendors Swagger UI for GET /docs from npm's swagger-ui-dist at a pinned version: the bundle
# (with its presets), the stylesheet and the licence are copied into assets/swagger-ui/ (committed)
# and embedded into the binary at build time (src/api/docs.rs), so /docs needs no network at run time.
# Run again after changing VERSION, then commit assets/swagger-ui/.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=5.36.0
FILES=(swagger-ui-bundle.js swagger-ui.css LICENSE NOTICE)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "swagger-ui-dist@$VERSION" >/dev/null)
tar -xzf "$work/swagger-ui-dist-$VERSION.tgz" -C "$work"
dest=assets/swagger-ui
rm -rf "$dest"
mkdir -p "$dest"
for f in "${FILES[@]}"; do
    if [ -f "$work/package/$f" ]; then cp "$work/package/$f" "$dest/$f"; fi
done
# The source maps are not shipped: the bundles' last-line references to them would make browsers'
# developer tools ask /docs for files that are not there.
for f in "$dest"/*.js "$dest"/*.css; do sed -i '/^\/[*/][#@] sourceMappingURL=/d' "$f"; done
echo "$VERSION" >"$dest/VERSION"
sha256sum "$dest"/* | sed "s#$dest/##" >"$work/SHA256SUMS" && mv "$work/SHA256SUMS" "$dest/SHA256SUMS"
echo "vendored swagger-ui-dist $VERSION into $dest:"
ls -l "$dest"
