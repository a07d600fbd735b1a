/*
 * A small gateway on gwsync: joins the group on one interface, sets the
 * scene it manages, and prints every change any gateway makes, until
 * SIGINT or SIGTERM. One thread, one poll() loop; gwsync runs no thread
 * of its own here (poll mode).
 *
 * Build (README.md, section "C API"), after installing the library with
 * `scripts/install.sh --prefix /usr/local`:
 *   cc -o gateway examples/c/gateway.c $(pkg-config --cflags --libs gwsync)
 * Run:
 *   ./gateway [INTERFACE [PORT [KEY_FILE]]]   e.g. ./gateway br-lan
 * KEY_FILE defaults to /etc/gwsync.key (made by `gwsync genkey`, the same
 * file on every gateway).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include <gwsync.h>

static volatile sig_atomic_t stop;

static void on_signal(int signal)
{
    (void)signal;
    stop = 1;
}

/* Called from gwsync_process, on this thread. The strings are borrowed:
 * copy what you keep. */
static void on_change(void *user, const char *key, const char *value_json,
                      const char *origin)
{
    const char *name = user;
    if (value_json)
        printf("%s: %s = %s (from %s)\n", name, key, value_json, origin);
    else
        printf("%s: %s deleted (by %s)\n", name, key, origin);
}

int main(int argc, char **argv)
{
    const char *interface = argc > 1 ? argv[1] : "br-lan";
    const char *port = argc > 2 ? argv[2] : "7373";
    const char *key_file = argc > 3 ? argv[3] : "/etc/gwsync.key";
    setvbuf(stdout, NULL, _IOLBF, 0);

    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);

    /* Real code would build this with a JSON library, escaping the values. */
    char config[1024];
    snprintf(config, sizeof config,
             "{\"interfaces\": [\"%s\"], \"port\": %s, \"key_file\": \"%s\", "
             "\"log_level\": \"warn\"}",
             interface, port, key_file);
    gwsync_t *g = gwsync_open(config);
    if (!g) {
        fprintf(stderr, "gwsync_open: %s\n", gwsync_last_error());
        return 1;
    }
    gwsync_on_change(g, on_change, "gateway");

    int rc = gwsync_set(g, "scene/living-room",
                        "{\"name\": \"Evening\", \"lights\": {\"ceiling\": 40, \"lamp\": 80}}");
    if (rc != GWSYNC_OK)
        fprintf(stderr, "gwsync_set: %d %s\n", rc, gwsync_last_error());

    char *status = NULL;
    if (gwsync_status(g, &status) == GWSYNC_OK) {
        printf("gateway ready: %s\n", status);
        gwsync_free(status);
    }

    while (!stop) {
        struct pollfd pfd = {.fd = gwsync_fd(g), .events = POLLIN};
        /* Asked every time round: a write brings the deadline closer. */
        int timeout = gwsync_timeout_ms(g);
        if (poll(&pfd, 1, timeout) < 0 && errno != EINTR) {
            perror("poll");
            break;
        }
        if (gwsync_process(g) != GWSYNC_OK) {
            fprintf(stderr, "gwsync_process: %s\n", gwsync_last_error());
            break;
        }
    }

    char *all = NULL;
    if (gwsync_dump(g, &all) == GWSYNC_OK) {
        printf("gateway stopping with %s\n", all);
        gwsync_free(all);
    }
    gwsync_close(g); /* flushes state when a state_dir is set */
    return 0;
}
