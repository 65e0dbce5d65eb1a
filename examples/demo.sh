#!/bin/bash
# The main job: mount the example layers with unionfs, show the merged view, then a copy-up
# and a whiteout landing in the upper layer. Everything happens in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
UNIONFS=${UNIONFS:-$(pwd)/.venv/bin/unionfs}
DEMO=$(mktemp -d /tmp/unionfs-demo.XXXXXX)
cleanup() {
    mountpoint -q "$DEMO/merged" && "$UNIONFS" umount "$DEMO/merged"
    rm -rf "$DEMO"
}
trap cleanup EXIT
cp -a examples/layers "$DEMO/layers"
mkdir "$DEMO/upper" "$DEMO/work" "$DEMO/merged"
L=$DEMO/layers

echo "## layers, top to bottom: patch, app, base (OCI .wh. markers inside)"
(cd "$L" && find . -mindepth 2 | sort | sed 's/^\.\//  /')

echo
echo "## mount"
echo "\$ unionfs mount --lower patch --lower app --lower base --upper upper --workdir work merged"
"$UNIONFS" mount --lower "$L/patch" --lower "$L/app" --lower "$L/base" \
    --upper "$DEMO/upper" --workdir "$DEMO/work" "$DEMO/merged"

echo
echo "## merged view (whiteouts and the opaque /opt/tool applied)"
(cd "$DEMO/merged" && find . -mindepth 1 | sort | sed 's/^\.\//  /')
echo
echo "\$ cat merged/etc/motd            # app's copy hides base's"
cat "$DEMO/merged/etc/motd"

echo
echo "## copy-up: append to /etc/motd, chmod /bin/hello, delete /etc/os-release"
echo "edited through the mount" >> "$DEMO/merged/etc/motd"
chmod 700 "$DEMO/merged/bin/hello"
rm "$DEMO/merged/etc/os-release"
echo "\$ unionfs inspect merged/etc/motd"
"$UNIONFS" inspect "$DEMO/merged/etc/motd"
echo "\$ unionfs inspect merged/etc/os-release"
"$UNIONFS" inspect "$DEMO/merged/etc/os-release"
echo
echo "## the upper layer now holds (kernel overlayfs format: c 0,0 = whiteout)"
(cd "$DEMO/upper" && find . -mindepth 1 | sort | while read -r p; do
    printf '  %-28s %s\n' "$p" "$(stat -c '%A %t,%T %s bytes' "$p")"
done)
echo
echo "## the lower layer is untouched"
echo "\$ cat layers/app/etc/motd"
cat "$L/app/etc/motd"

"$UNIONFS" umount "$DEMO/merged"
echo
echo "unmounted; demo directory removed"
