/*
 * One gateway in poll mode, driven line by line on stdin by tests/c_api.rs:
 *
 *   set KEY JSON   ->  "ok set" | "err CODE MESSAGE"
 *   del KEY        ->  "ok del" | "err CODE MESSAGE"
 *   get KEY        ->  "value JSON" | "notfound"
 *   quit / EOF     ->  closes the handle and exits 0
 *
 * Every change callback prints "change KEY ORIGIN VALUE", VALUE being
 * "(deleted)" for a delete. Usage: node PORT NODE_ID [KEY_FILE]
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gwsync.h"

static void on_change(void *user, const char *key, const char *value_json,
                      const char *origin)
{
    int *changes = user;
    ++*changes;
    printf("change %s %s %s\n", key, origin,
           value_json ? value_json : "(deleted)");
}

static void command(gwsync_t *g, char *line)
{
    char *verb = strtok(line, " ");
    char *key = strtok(NULL, " ");
    char *rest = strtok(NULL, "");
    if (!verb || !key) {
        printf("err usage\n");
        return;
    }
    int rc;
    if (strcmp(verb, "set") == 0 && rest) {
        rc = gwsync_set(g, key, rest);
    } else if (strcmp(verb, "del") == 0) {
        rc = gwsync_delete(g, key);
    } else if (strcmp(verb, "get") == 0) {
        char *value = NULL;
        rc = gwsync_get(g, key, &value);
        if (rc == GWSYNC_OK) {
            printf("value %s\n", value);
            gwsync_free(value);
        } else if (rc == GWSYNC_ERR_NOT_FOUND) {
            printf("notfound\n");
        } else {
            printf("err %d %s\n", rc, gwsync_last_error());
        }
        return;
    } else {
        printf("err usage\n");
        return;
    }
    if (rc == GWSYNC_OK)
        printf("ok %s\n", verb);
    else
        printf("err %d %s\n", rc, gwsync_last_error());
}

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: node PORT NODE_ID [KEY_FILE]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    char key[300] = ",\"open\":true";
    if (argc == 4)
        snprintf(key, sizeof key, ",\"key_file\":\"%s\"", argv[3]);
    /* A state directory for tests of persistence (no JSON escaping: test
     * paths hold none of '"' or '\\'). */
    char state[300] = "";
    const char *state_dir = getenv("GWSYNC_TEST_STATE_DIR");
    if (state_dir)
        snprintf(state, sizeof state, ",\"state_dir\":\"%s\"", state_dir);
    char config[1024];
    snprintf(config, sizeof config,
             "{\"interfaces\":[\"lo\"],\"port\":%s,\"node_id\":\"%s\","
             "\"log_level\":\"%s\"%s%s}",
             argv[1], argv[2], argc == 4 ? "warn" : "error", key, state);
    gwsync_t *g = gwsync_open(config);
    if (!g) {
        fprintf(stderr, "gwsync_open: %s\n", gwsync_last_error());
        return 1;
    }
    int changes = 0;
    if (gwsync_on_change(g, on_change, &changes) != GWSYNC_OK)
        return 1;
    printf("ready %s\n", argv[2]);

    char buffer[8192];
    size_t used = 0;
    int running = 1;
    while (running) {
        struct pollfd fds[2] = {
            {.fd = STDIN_FILENO, .events = POLLIN},
            {.fd = gwsync_fd(g), .events = POLLIN},
        };
        if (poll(fds, 2, gwsync_timeout_ms(g)) < 0 && errno != EINTR) {
            perror("poll");
            return 1;
        }
        if (gwsync_process(g) != GWSYNC_OK) {
            fprintf(stderr, "gwsync_process: %s\n", gwsync_last_error());
            return 1;
        }
        if (!(fds[0].revents & (POLLIN | POLLHUP)))
            continue;
        ssize_t got = read(STDIN_FILENO, buffer + used, sizeof buffer - 1 - used);
        if (got <= 0)
            break;
        used += (size_t)got;
        buffer[used] = '\0';
        char *line = buffer, *end;
        while ((end = strchr(line, '\n'))) {
            *end = '\0';
            if (strcmp(line, "quit") == 0) {
                running = 0;
                break;
            }
            command(g, line);
            /* Deliver the local change now, so its line comes right
             * after the "ok". */
            gwsync_process(g);
            line = end + 1;
        }
        used = strlen(line);
        memmove(buffer, line, used);
    }
    gwsync_close(g);
    fprintf(stderr, "node %s: %d changes seen\n", argv[2], changes);
    return 0;
}
