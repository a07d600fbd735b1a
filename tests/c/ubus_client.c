/* A C gateway component using gwsync through ubus with libubus only: it
 * listens for gwsync.change, calls gwsync set and get, and waits for the
 * event of its own write. Driven by tests/ubus.rs.
 *
 *   ubus_client SOCKET KEY VALUE_JSON
 *
 * Prints "get: <reply JSON>" and "event: <event JSON>"; exits 0 once the
 * event for KEY arrived, 1 on any failure or after 10 s. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libubox/blobmsg_json.h>
#include <libubox/uloop.h>
#include <libubus.h>

static const char *wanted_key;
static int got_event;

static void on_change(struct ubus_context *ctx, struct ubus_event_handler *ev,
		      const char *type, struct blob_attr *msg)
{
	struct blob_attr *key = NULL, *cur;
	size_t rem;
	char *json;

	(void)ctx;
	(void)ev;
	(void)type;
	blobmsg_for_each_attr(cur, msg, rem)
		if (!strcmp(blobmsg_name(cur), "key"))
			key = cur;
	if (!key || blobmsg_type(key) != BLOBMSG_TYPE_STRING ||
	    strcmp(blobmsg_get_string(key), wanted_key))
		return;
	json = blobmsg_format_json(msg, true);
	printf("event: %s\n", json ? json : "?");
	free(json);
	got_event = 1;
	uloop_end();
}

static void on_reply(struct ubus_request *req, int type, struct blob_attr *msg)
{
	char *json = blobmsg_format_json(msg, true);

	(void)type;
	printf("%s: %s\n", (const char *)req->priv, json ? json : "?");
	free(json);
}

static void on_timeout(struct uloop_timeout *t)
{
	(void)t;
	fprintf(stderr, "no gwsync.change event for %s within 10 s\n", wanted_key);
	uloop_end();
}

int main(int argc, char **argv)
{
	static struct ubus_event_handler listener = { .cb = on_change };
	static struct uloop_timeout deadline = { .cb = on_timeout };
	static struct blob_buf b;
	struct ubus_context *ctx;
	uint32_t id;
	int ret;

	if (argc != 4) {
		fprintf(stderr, "usage: %s SOCKET KEY VALUE_JSON\n", argv[0]);
		return 2;
	}
	wanted_key = argv[2];
	uloop_init();
	ctx = ubus_connect(argv[1]);
	if (!ctx) {
		fprintf(stderr, "cannot connect to ubusd at %s\n", argv[1]);
		return 1;
	}
	ubus_add_uloop(ctx);
	/* Registered before the write, so its event cannot be missed. */
	ret = ubus_register_event_handler(ctx, &listener, "gwsync.change");
	if (ret || ubus_lookup_id(ctx, "gwsync", &id)) {
		fprintf(stderr, "listen or lookup failed: %s\n", ubus_strerror(ret));
		return 1;
	}

	/* set {key, value}: the value is any JSON, carried as blobmsg. */
	blob_buf_init(&b, 0);
	blobmsg_add_string(&b, "key", argv[2]);
	{
		char body[4096];
		snprintf(body, sizeof(body), "{\"value\":%s}", argv[3]);
		if (!blobmsg_add_json_from_string(&b, body)) {
			fprintf(stderr, "value is not JSON: %s\n", argv[3]);
			return 2;
		}
	}
	ret = ubus_invoke(ctx, id, "set", b.head, NULL, NULL, 3000);
	if (ret) {
		fprintf(stderr, "set: %s\n", ubus_strerror(ret));
		return 1;
	}

	blob_buf_init(&b, 0);
	blobmsg_add_string(&b, "key", argv[2]);
	ret = ubus_invoke(ctx, id, "get", b.head, on_reply, "get", 3000);
	if (ret) {
		fprintf(stderr, "get: %s\n", ubus_strerror(ret));
		return 1;
	}

	blob_buf_init(&b, 0);
	blobmsg_add_string(&b, "key", "c/does-not-exist");
	ret = ubus_invoke(ctx, id, "get", b.head, NULL, NULL, 3000);
	printf("get missing: %d %s\n", ret, ubus_strerror(ret));

	if (!got_event) {
		uloop_timeout_set(&deadline, 10000);
		uloop_run();
	}
	ubus_free(ctx);
	uloop_done();
	blob_buf_free(&b);
	fflush(stdout);
	return got_event ? 0 : 1;
}
