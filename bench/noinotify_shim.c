/* LD_PRELOAD shim: inotify is "unavailable", so the pitr daemon falls back to its periodic rescan.
 * Used only to estimate what the daemon costs without its inotify self-trigger loop. */
#include <errno.h>
int inotify_init(void) { errno = ENOSYS; return -1; }
int inotify_init1(int flags) { (void)flags; errno = ENOSYS; return -1; }
