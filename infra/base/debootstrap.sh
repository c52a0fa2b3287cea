#!/usr/bin/env bash
# The images' base, built from Debian's packages where no image registry answers (an air-gapped cluster, CI here):
# Debian bookworm (minbase) with python3.11, its venv module and the CA certificates, imported as IMAGE.
#
#   infra/base/debootstrap.sh [IMAGE]        # default IMAGE: localhost/aeforge-base:bookworm-py3.11
#
# Then build with --build-arg BASE_IMAGE=IMAGE (infra/stack.sh build does). The Debian mirror is this machine's own
# (its apt configuration), or DEBIAN_MIRROR; none is written in the repository. Needs root and debootstrap.
set -euo pipefail

IMAGE=${1:-localhost/aeforge-base:bookworm-py3.11}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
ENGINE=${ENGINE:-podman}

# The mirror this machine's apt uses for the suite (its sources, not a host of ours).
mirror=${DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(CODENAME)' 2>/dev/null \
    | awk -v s="$SUITE" '$2 == s {print $1; exit}')}
if [ -z "$mirror" ]; then
    echo "debootstrap.sh: no apt source for $SUITE on this machine; set DEBIAN_MIRROR" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/aeforge-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
# In two stages, so that dpkg skips its fsync()s while it installs the packages (the second stage), as it does in
# later builds from this image (the PostgreSQL stand-in's apt-get): an image is committed whole or not at all, so the
# syncs only cost time, which on a busy disk is much.
failed() { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
debootstrap --foreign --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || failed
mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/aeforge-unsafe-io"
chroot "$root" /debootstrap/debootstrap --second-stage >>"$work/debootstrap.log" 2>&1 || failed
# What a container image does not need: downloaded packages, package lists, manuals, translations (each package's
# copyright file stays).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/man/* \
       "$root"/usr/share/locale/* "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
find "$root/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
# apt in derived images (the PostgreSQL stand-in) fetches from the same mirror.
echo "deb $mirror $SUITE main" >"$root/etc/apt/sources.list"

tar --numeric-owner -C "$root" --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -c . |
    "$ENGINE" import --quiet \
        --change 'CMD ["/bin/bash"]' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL org.opencontainers.image.description=Debian $SUITE minbase with python3 (debootstrap)" \
        - "$IMAGE" >/dev/null
echo "$IMAGE"
