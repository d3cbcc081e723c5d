# Shared by the benchmark scripts; sourced, not run.

# prewarm_memory MIB: write MIB MiB to tmpfs and delete it, so that the timed phase that follows
# finds that much recently freed, host-backed memory.
#
# Why: this VM (Firecracker, virtio-balloon with free page reporting) hands memory that stays free
# for a few seconds back to the host, and the guest's next touch of such a page faults to the
# host. Writing 3000 MiB into the page cache took 5.4 s on such pages and 0.6-1.0 s on recently
# freed ones (`dd of=/tmp/x bs=1M count=3000`, measured 2026-12-02), so whichever run happened to
# follow another one's deletes was several times faster: a property of the VM, not of the tool.
# Every timed phase (pgBackRest's, pitr's and the physical limits alike) is preceded by this.
# PREWARM=0 turns it off.
prewarm_memory() {
  [ "${PREWARM:-1}" = 1 ] || return 0
  local mib=$1 file=/dev/shm/pitr-bench-prewarm
  dd if=/dev/zero of="$file" bs=1M count="$mib" status=none 2>/dev/null || true
  rm -f "$file"
}
