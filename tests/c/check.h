/* CHECK for the C tests: on failure, prints where, what, and gwsync's last
 * error for this thread, and exits 1 (tests/c_api.rs shows the stderr). */
#ifndef GWSYNC_TEST_CHECK_H
#define GWSYNC_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include "gwsync.h"

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s (last error: \"%s\")\n", \
                    __FILE__, __LINE__, #cond, gwsync_last_error());       \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

#endif
