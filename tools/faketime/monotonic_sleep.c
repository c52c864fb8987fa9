/* A companion to Debian's libfaketime 0.9.10 for the hour-of-day runs (tools/test_hours.sh).
 *
 * The runs fake the wall clock only (FAKETIME_DONT_FAKE_MONOTONIC=1): the hour of day is what the
 * suite must not depend on, and a faked monotonic clock breaks Python's lock timeouts (its
 * sem_clockwait deadlines, taken on the faked clock, are waited for on the real one: hangs).
 * With the monotonic clock left real, libfaketime 0.9.10 still shifts absolute CLOCK_MONOTONIC
 * deadlines given to clock_nanosleep (Python's time.sleep) by the wall-clock offset, which
 * fails with EINVAL. This library, preloaded before libfaketime, hands those straight to the
 * kernel: the monotonic clock is real, so they need no conversion. Everything else goes on to
 * libfaketime. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *request, struct timespec *remain) {
    if (clock_id == CLOCK_MONOTONIC) {
        long rc = syscall(SYS_clock_nanosleep, clock_id, flags, request, remain);
        return rc == -1 ? errno : 0;
    }
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);
    if (!next) {
        next = (int (*)(clockid_t, int, const struct timespec *, struct timespec *))dlsym(RTLD_NEXT, "clock_nanosleep");
    }
    return next(clock_id, flags, request, remain);
}
