/*
 * Thread mode: two writer threads call gwsync_set/gwsync_get/gwsync_dump
 * while gwsync's background thread syncs with a peer (tests/c/node.c,
 * started by tests/c_api.rs) and runs the change callback, which itself
 * reads back through the API. Run under valgrind's helgrind by the test.
 *
 * Usage: threads PORT NODE_ID. Prints "written" once both writers are
 * done, then waits for the peer to set "peer/done"; prints "ok" and exits
 * 0 when every check passed.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "gwsync.h"

#define WRITERS 2
#define WRITES 50

static gwsync_t *g;
static pthread_t writers[WRITERS];
static pthread_t main_thread;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static int local_changes; /* changes with our own origin */
static int peer_done;
static int callback_on_wrong_thread;
static pthread_t callback_thread;
static int callback_threads_seen;

static const char *own_id;

static void on_change(void *user, const char *key, const char *value_json,
                      const char *origin)
{
    (void)user;
    /* Reading back from the callback, on the background thread, while the
     * writers hold no gwsync lock across calls: must not deadlock. */
    char *now = NULL;
    int rc = gwsync_get(g, key, &now);
    CHECK(rc == GWSYNC_OK || rc == GWSYNC_ERR_NOT_FOUND);
    if (rc == GWSYNC_OK)
        gwsync_free(now);

    pthread_t self = pthread_self();
    pthread_mutex_lock(&lock);
    if (pthread_equal(self, main_thread))
        callback_on_wrong_thread = 1;
    for (int i = 0; i < WRITERS; i++)
        if (pthread_equal(self, writers[i]))
            callback_on_wrong_thread = 1;
    if (callback_threads_seen == 0) {
        callback_thread = self;
        callback_threads_seen = 1;
    } else if (!pthread_equal(self, callback_thread)) {
        callback_threads_seen = 2;
    }
    if (strcmp(origin, own_id) == 0)
        local_changes++;
    if (strcmp(key, "peer/done") == 0 && value_json && strcmp(value_json, "true") == 0)
        peer_done = 1;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
}

static void *writer(void *arg)
{
    int me = (int)(long)arg;
    char key[64], value[64], other[64];
    for (int i = 0; i < WRITES; i++) {
        snprintf(key, sizeof key, "t%d/%d", me, i);
        snprintf(value, sizeof value, "{\"writer\":%d,\"i\":%d}", me, i);
        CHECK(gwsync_set(g, key, value) == GWSYNC_OK);
        char *back = NULL;
        CHECK(gwsync_get(g, key, &back) == GWSYNC_OK);
        CHECK(strcmp(back, value) == 0);
        gwsync_free(back);
        /* The other writer's key may or may not be there yet. */
        snprintf(other, sizeof other, "t%d/%d", 1 - me, i);
        int rc = gwsync_get(g, other, &back);
        CHECK(rc == GWSYNC_OK || rc == GWSYNC_ERR_NOT_FOUND);
        if (rc == GWSYNC_OK)
            gwsync_free(back);
        if (i % 10 == 0) {
            char *dump = NULL;
            CHECK(gwsync_dump(g, &dump) == GWSYNC_OK);
            CHECK(strstr(dump, key) != NULL);
            gwsync_free(dump);
        }
    }
    return NULL;
}

/* Waits until `done` holds, up to 60 s (helgrind is slow). */
static int wait_for(int (*done)(void))
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 60;
    pthread_mutex_lock(&lock);
    int rc = 0;
    while (!done() && rc == 0)
        rc = pthread_cond_timedwait(&changed, &lock, &deadline);
    int ok = done();
    pthread_mutex_unlock(&lock);
    return ok;
}

static int all_local_seen(void) { return local_changes == WRITERS * WRITES; }
static int peer_is_done(void) { return peer_done; }

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: threads PORT NODE_ID\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    own_id = argv[2];
    main_thread = pthread_self();
    char config[256];
    snprintf(config, sizeof config,
             "{\"interfaces\":[\"lo\"],\"port\":%s,\"node_id\":\"%s\",\"log_level\":\"off\","
             "\"open\":true}",
             argv[1], argv[2]);
    g = gwsync_open(config);
    CHECK(g != NULL);
    CHECK(gwsync_on_change(g, on_change, NULL) == GWSYNC_OK);
    /* The writers' ids must be known before the first callback compares
     * against them: the lock orders these stores before its reads. */
    pthread_mutex_lock(&lock);
    for (long i = 0; i < WRITERS; i++)
        CHECK(pthread_create(&writers[i], NULL, writer, (void *)i) == 0);
    pthread_mutex_unlock(&lock);
    CHECK(gwsync_start_thread(g) == GWSYNC_OK);
    for (int i = 0; i < WRITERS; i++)
        CHECK(pthread_join(writers[i], NULL) == 0);

    CHECK(wait_for(all_local_seen));
    printf("written\n");
    CHECK(wait_for(peer_is_done));

    pthread_mutex_lock(&lock);
    CHECK(!callback_on_wrong_thread);
    CHECK(callback_threads_seen == 1);
    pthread_mutex_unlock(&lock);

    CHECK(gwsync_shutdown(g) == GWSYNC_OK);
    CHECK(gwsync_set(g, "late", "1") == GWSYNC_ERR_STATE);
    gwsync_close(g);
    printf("ok\n");
    return 0;
}
