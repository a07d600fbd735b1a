/*
 * The C API contract, call by call: NULL pointers, invalid UTF-8, invalid
 * JSON, oversized keys and values, a shut-down handle and the wrong mode
 * each return the documented code and leave gwsync_last_error() set; a
 * failed call leaves its out-parameter alone; the change callback sees
 * the right key, value and origin and may call back into the API.
 *
 * Run by tests/c_api.rs, also under valgrind. Usage: api_contract PORT
 * Prints "ok" and exits 0 when every check passed.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "gwsync.h"

/* Calls checked against their documented error. */
static int checks;

/* A handle whose calls succeed, to clear the last error between checks so
 * that each check sees the message of its own call. */
static gwsync_t *clean;

static void clear_error(void)
{
    CHECK(gwsync_timeout_ms(clean) >= GWSYNC_NO_DEADLINE);
    CHECK(gwsync_last_error()[0] == '\0');
}

#define EXPECT(call, code)                                                 \
    do {                                                                   \
        clear_error();                                                     \
        int rc_ = (call);                                                  \
        if (rc_ != (code) || gwsync_last_error()[0] == '\0') {             \
            fprintf(stderr, "%s:%d: %s returned %d, expected %d "          \
                    "(last error: \"%s\")\n", __FILE__, __LINE__, #call,   \
                    rc_, (code), gwsync_last_error());                     \
            exit(1);                                                       \
        }                                                                  \
        ++checks;                                                          \
    } while (0)

#define EXPECT_OPEN_FAILS(config)                                          \
    do {                                                                   \
        clear_error();                                                     \
        gwsync_t *g_ = gwsync_open(config);                                \
        CHECK(g_ == NULL);                                                 \
        CHECK(gwsync_last_error()[0] != '\0');                             \
        ++checks;                                                          \
    } while (0)

static const char BAD_UTF8[] = "scene/\xff\xfe";
/* An inline group key (the "keys" config key); real gateways use a key
 * file made by `gwsync genkey`. */
#define TEST_KEYS "\"keys\":[\"5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a\"]"

static char *big_value; /* one JSON string over the 64 KiB value limit */
static char *big_key;   /* over the 256-byte key limit */
static char sentinel_storage;
static char *const SENTINEL = &sentinel_storage;

struct seen {
    gwsync_t *g;
    int count;
    char key[64];
    char value[256];
    char origin[32];
    int deleted;
    int reentry_done;
};

static void on_change(void *user, const char *key, const char *value_json,
                      const char *origin)
{
    struct seen *seen = user;
    seen->count++;
    snprintf(seen->key, sizeof seen->key, "%s", key);
    snprintf(seen->value, sizeof seen->value, "%s", value_json ? value_json : "");
    snprintf(seen->origin, sizeof seen->origin, "%s", origin);
    seen->deleted = value_json == NULL;

    /* Reading back from inside the callback works and agrees. */
    char *now = SENTINEL;
    int rc = gwsync_get(seen->g, key, &now);
    if (value_json) {
        CHECK(rc == GWSYNC_OK);
        CHECK(strcmp(now, value_json) == 0);
        gwsync_free(now);
    } else {
        CHECK(rc == GWSYNC_ERR_NOT_FOUND);
        CHECK(now == SENTINEL);
    }
    /* What must not run from a callback is refused, not deadlocked. */
    if (!seen->reentry_done) {
        seen->reentry_done = 1;
        CHECK(gwsync_process(seen->g) == GWSYNC_ERR_STATE);
        CHECK(gwsync_last_error()[0] != '\0');
        CHECK(gwsync_start_thread(seen->g) == GWSYNC_ERR_STATE);
        CHECK(gwsync_shutdown(seen->g) == GWSYNC_ERR_STATE);
        gwsync_close(seen->g); /* refused: the handle stays open */
        CHECK(strstr(gwsync_last_error(), "callback") != NULL);
        CHECK(gwsync_set(seen->g, "from/callback", "true") == GWSYNC_OK);
    }
}

static void null_and_bad_arguments(gwsync_t *g)
{
    char *out = SENTINEL;

    EXPECT_OPEN_FAILS(NULL);
    EXPECT_OPEN_FAILS("{\"log_level\":\"\xff\"}");
    EXPECT_OPEN_FAILS("{\"port\":");
    EXPECT_OPEN_FAILS("[1,2]");
    EXPECT_OPEN_FAILS("{\"no_such_key\":1}");
    EXPECT_OPEN_FAILS("{\"port\":0}");
    EXPECT_OPEN_FAILS("{\"group\":\"192.168.1.1\"}");
    EXPECT_OPEN_FAILS("{\"node_id\":\"not hex\"}");
    EXPECT_OPEN_FAILS("{\"key_file\":\"/nonexistent/gwsync.key\"}");
    /* Keyed by default: no key and no "open": true is refused, saying how
     * to fix it. */
    EXPECT_OPEN_FAILS("{\"interfaces\":[\"lo\"]}");
    CHECK(strstr(gwsync_last_error(), "\"open\": true") != NULL);
    CHECK(strstr(gwsync_last_error(), "\"key_file\"") != NULL);
    EXPECT_OPEN_FAILS("{\"open\":true," TEST_KEYS "}");
    EXPECT_OPEN_FAILS("{\"keys\":[]}");
    EXPECT_OPEN_FAILS("{\"keys\":[\"00\"]}");
    EXPECT_OPEN_FAILS("{\"open\":true,\"open\":true}");
    EXPECT_OPEN_FAILS("{\"open\":true,\"max_entries\":0}");
    EXPECT_OPEN_FAILS("{\"open\":true,\"tombstone_lifetime_s\":1}");

    EXPECT(gwsync_set(NULL, "k", "1"), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_set(g, NULL, "1"), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_set(g, "k", NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_set(g, BAD_UTF8, "1"), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_set(g, "k", "\"\xff\""), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_set(g, "k", "{\"on\": tru"), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_set(g, "k", "1 2"), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_set(g, "k", ""), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_set(g, "", "1"), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_set(g, "k", big_value), GWSYNC_ERR_TOO_LARGE);
    EXPECT(gwsync_set(g, big_key, "1"), GWSYNC_ERR_TOO_LARGE);

    EXPECT(gwsync_get(NULL, "k", &out), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_get(g, NULL, &out), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_get(g, "k", NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_get(g, BAD_UTF8, &out), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_get(g, "", &out), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_get(g, "no/such/key", &out), GWSYNC_ERR_NOT_FOUND);
    EXPECT(gwsync_get(g, big_key, &out), GWSYNC_ERR_NOT_FOUND);

    EXPECT(gwsync_delete(NULL, "k"), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_delete(g, NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_delete(g, BAD_UTF8), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_delete(g, ""), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_delete(g, "no/such/key"), GWSYNC_ERR_NOT_FOUND);
    EXPECT(gwsync_delete(g, big_key), GWSYNC_ERR_NOT_FOUND);

    EXPECT(gwsync_dump(NULL, &out), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_dump(g, NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_list(NULL, "", &out), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_list(g, NULL, &out), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_list(g, BAD_UTF8, &out), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_list(g, "", NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_status(NULL, &out), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_status(g, NULL), GWSYNC_ERR_INVALID);

    EXPECT(gwsync_trigger(NULL, GWSYNC_TRIGGER_MANUAL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_trigger(g, 0), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_trigger(g, 99), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_on_change(NULL, NULL, NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_fd(NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_timeout_ms(NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_process(NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_start_thread(NULL), GWSYNC_ERR_INVALID);
    EXPECT(gwsync_shutdown(NULL), GWSYNC_ERR_INVALID);

    /* No failed call wrote its out-parameter. */
    CHECK(out == SENTINEL);

    /* NULL is a no-op for the two freeing calls. */
    gwsync_free(NULL);
    gwsync_close(NULL);
}

static void values_and_callbacks(gwsync_t *g, const char *node_id)
{
    struct seen seen = {.g = g};
    CHECK(gwsync_on_change(g, on_change, &seen) == GWSYNC_OK);
    CHECK(gwsync_fd(g) >= 0);

    CHECK(gwsync_set(g, "scene/evening", "{ \"on\": true, \"level\": 40 }") == GWSYNC_OK);
    CHECK(gwsync_last_error()[0] == '\0');
    CHECK(gwsync_timeout_ms(g) == 0); /* the change is due for delivery */
    CHECK(gwsync_process(g) == GWSYNC_OK);
    /* The write, then the callback's own write (delivered in the same
     * process call or the next). */
    CHECK(gwsync_process(g) == GWSYNC_OK);
    CHECK(seen.count == 2);
    CHECK(seen.reentry_done);
    CHECK(strcmp(seen.key, "from/callback") == 0);
    CHECK(strcmp(seen.value, "true") == 0);
    CHECK(strcmp(seen.origin, node_id) == 0);

    char *value = NULL;
    CHECK(gwsync_get(g, "scene/evening", &value) == GWSYNC_OK);
    CHECK(strcmp(value, "{\"on\":true,\"level\":40}") == 0);
    gwsync_free(value);

    char *json = NULL;
    CHECK(gwsync_dump(g, &json) == GWSYNC_OK);
    CHECK(strcmp(json, "{\"from/callback\":true,\"scene/evening\":{\"on\":true,\"level\":40}}") == 0);
    gwsync_free(json);
    CHECK(gwsync_list(g, "scene/", &json) == GWSYNC_OK);
    CHECK(strcmp(json, "[\"scene/evening\"]") == 0);
    gwsync_free(json);
    CHECK(gwsync_status(g, &json) == GWSYNC_OK);
    CHECK(strstr(json, node_id) != NULL);
    gwsync_free(json);

    CHECK(gwsync_delete(g, "scene/evening") == GWSYNC_OK);
    CHECK(gwsync_process(g) == GWSYNC_OK);
    CHECK(seen.count == 3);
    CHECK(strcmp(seen.key, "scene/evening") == 0);
    CHECK(seen.deleted);
    CHECK(strcmp(seen.origin, node_id) == 0);
    CHECK(gwsync_get(g, "scene/evening", &value) == GWSYNC_ERR_NOT_FOUND);

    for (int reason = GWSYNC_TRIGGER_POWER_ON; reason <= GWSYNC_TRIGGER_MANUAL; reason++)
        CHECK(gwsync_trigger(g, reason) == GWSYNC_OK);
    CHECK(gwsync_process(g) == GWSYNC_OK);

    /* Without a callback, changes are not kept and nothing is called. */
    CHECK(gwsync_on_change(g, NULL, NULL) == GWSYNC_OK);
    CHECK(gwsync_set(g, "quiet", "1") == GWSYNC_OK);
    CHECK(gwsync_process(g) == GWSYNC_OK);
    CHECK(seen.count == 3);
}

/* Thread mode turns the poll-mode calls away; a shut-down handle turns
 * everything away, without touching freed memory. */
static void wrong_state(gwsync_t *g)
{
    char *out = SENTINEL;
    CHECK(gwsync_start_thread(g) == GWSYNC_OK);
    EXPECT(gwsync_start_thread(g), GWSYNC_ERR_STATE);
    EXPECT(gwsync_process(g), GWSYNC_ERR_STATE);
    EXPECT(gwsync_fd(g), GWSYNC_ERR_STATE);
    EXPECT(gwsync_timeout_ms(g), GWSYNC_ERR_STATE);
    CHECK(gwsync_set(g, "threaded", "[1,2,3]") == GWSYNC_OK);
    CHECK(gwsync_get(g, "threaded", &out) == GWSYNC_OK);
    CHECK(strcmp(out, "[1,2,3]") == 0);
    gwsync_free(out);
    out = SENTINEL;

    CHECK(gwsync_shutdown(g) == GWSYNC_OK);
    EXPECT(gwsync_set(g, "k", "1"), GWSYNC_ERR_STATE);
    EXPECT(gwsync_get(g, "threaded", &out), GWSYNC_ERR_STATE);
    EXPECT(gwsync_delete(g, "threaded"), GWSYNC_ERR_STATE);
    EXPECT(gwsync_dump(g, &out), GWSYNC_ERR_STATE);
    EXPECT(gwsync_list(g, "", &out), GWSYNC_ERR_STATE);
    EXPECT(gwsync_status(g, &out), GWSYNC_ERR_STATE);
    EXPECT(gwsync_trigger(g, GWSYNC_TRIGGER_MANUAL), GWSYNC_ERR_STATE);
    EXPECT(gwsync_on_change(g, on_change, NULL), GWSYNC_ERR_STATE);
    EXPECT(gwsync_fd(g), GWSYNC_ERR_STATE);
    EXPECT(gwsync_timeout_ms(g), GWSYNC_ERR_STATE);
    EXPECT(gwsync_process(g), GWSYNC_ERR_STATE);
    EXPECT(gwsync_start_thread(g), GWSYNC_ERR_STATE);
    CHECK(out == SENTINEL);
    CHECK(gwsync_shutdown(g) == GWSYNC_OK); /* again: harmless */
    gwsync_close(g);
}

/* gwsync_close flushes: a value set just before it is there on reopen,
 * with the same node id, and never reached the network's debounce. */
static void close_flushes_state(const char *port, const char *state_dir)
{
    char config[512];
    snprintf(config, sizeof config,
             "{\"interfaces\":[\"lo\"],\"port\":%s,\"state_dir\":\"%s\",\"log_level\":\"off\","
             "\"open\":true,\"max_entries\":1000,\"max_store_bytes\":1000000,"
             "\"tombstone_lifetime_s\":3600}",
             port, state_dir);
    gwsync_t *g = gwsync_open(config);
    CHECK(g != NULL);
    CHECK(gwsync_set(g, "kept", "{\"across\":\"restarts\"}") == GWSYNC_OK);
    char *status = NULL, *again = NULL;
    CHECK(gwsync_status(g, &status) == GWSYNC_OK);
    gwsync_close(g);

    g = gwsync_open(config);
    CHECK(g != NULL);
    char *value = NULL;
    CHECK(gwsync_get(g, "kept", &value) == GWSYNC_OK);
    CHECK(strcmp(value, "{\"across\":\"restarts\"}") == 0);
    gwsync_free(value);
    CHECK(gwsync_status(g, &again) == GWSYNC_OK);
    /* "node_id":"<16 hex digits>" appears in both. */
    const char *id = strstr(status, "\"node_id\":\"");
    CHECK(id != NULL);
    CHECK(strncmp(id, strstr(again, "\"node_id\":\""), 28) == 0);
    gwsync_free(status);
    gwsync_free(again);
    gwsync_close(g);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: api_contract PORT STATE_DIR\n");
        return 2;
    }
    const char *version = gwsync_version();
    CHECK(version != NULL && version[0] >= '0' && version[0] <= '9');

    big_value = malloc(70 * 1024);
    memset(big_value, 'a', 70 * 1024 - 1);
    big_value[0] = '"';
    big_value[70 * 1024 - 2] = '"';
    big_value[70 * 1024 - 1] = '\0';
    big_key = malloc(301);
    memset(big_key, 'k', 300);
    big_key[300] = '\0';

    const char *node_id = "00000000000000c1";
    char config[256];
    snprintf(config, sizeof config,
             "{\"interfaces\":[\"lo\"],\"port\":%s,\"node_id\":\"%s\",\"log_level\":\"off\","
             "%s}",
             argv[1], node_id, TEST_KEYS);
    char clean_config[256];
    snprintf(clean_config, sizeof clean_config,
             "{\"interfaces\":[\"lo\"],\"port\":%s,\"node_id\":\"c0\",\"log_level\":\"off\","
             "\"open\":true}",
             argv[1]);
    clean = gwsync_open(clean_config);
    CHECK(clean != NULL);
    CHECK(gwsync_last_error()[0] == '\0');
    gwsync_t *g = gwsync_open(config);
    CHECK(g != NULL);

    null_and_bad_arguments(g);
    values_and_callbacks(g, node_id);
    gwsync_close(g);

    gwsync_t *threaded = gwsync_open(config);
    CHECK(threaded != NULL);
    wrong_state(threaded);

    close_flushes_state(argv[1], argv[2]);

    gwsync_close(clean);
    free(big_value);
    free(big_key);
    printf("ok: %d checks\n", checks);
    return 0;
}
