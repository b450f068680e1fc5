/*
 * An example Strata driver plugin in C, built from sdk/include/strata_driver.h
 * alone (URI examplec:///):
 *
 *     cc -shared -fPIC -I sdk/include -o libexamplec.so tests/plugins/example-c/example.c -lpthread
 *
 * A hypervisor that runs nothing: its domains, snapshots and disk sets are
 * files in a state directory (the URI's root=DIR, else $STRATA_EXAMPLE_STATE),
 * so separate strata runs see the same state. It answers define_xml,
 * list_domains, domain_info, dump_xml, undefine, start, destroy,
 * snapshot_create, snapshot_list, snapshot_revert and the diskset calls but
 * diskset_add_all; every other call gets the no-support error. Its JSON is
 * built as strings: a domain's XML is kept as the JSON string it came in
 * (still escaped) and sent back as it is.
 *
 * Lifecycle events go to the host's callbacks. With
 * $STRATA_EXAMPLEC_NOTIFY_AFTER_STOP set, it misbehaves on purpose: told to
 * stop notifying through a callback, it notifies through it once more and
 * prints what the host answered.
 *
 * EXAMPLEC_ABI_VERSION (the header's STRATA_ABI_VERSION unless defined on the
 * command line) is the version its table claims, and EXAMPLEC_SCHEME
 * ("examplec" unless defined) the scheme.
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "strata_driver.h"

#ifndef EXAMPLEC_ABI_VERSION
#define EXAMPLEC_ABI_VERSION STRATA_ABI_VERSION
#endif

#ifndef EXAMPLEC_SCHEME
#define EXAMPLEC_SCHEME "examplec"
#endif

#define MAX_CALLBACKS 8

struct connection {
    char root[1024];
    char uri[1024];
    pthread_mutex_t lock;
    const StrataCallback *callbacks[MAX_CALLBACKS];
};

/* A growing string. */
struct buf {
    char *text;
    size_t len, cap;
};

static void buf_add(struct buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (b->len + (size_t)n + 1 > b->cap) {
        size_t cap = (b->len + (size_t)n + 1) * 2;
        char *grown = realloc(b->text, cap);
        if (!grown)
            return;
        b->text = grown;
        b->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(b->text + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static StrataBytes buf_bytes(struct buf *b) {
    StrataBytes bytes = {(uint8_t *)b->text, b->len};
    return bytes;
}

/* The raw (still escaped) JSON string value of "key" in json, or NULL. */
static char *json_string(const char *json, const char *key) {
    char pattern[128];
    snprintf(pattern, sizeof pattern, "\"%s\":\"", key);
    for (const char *at = strstr(json, pattern); at; at = strstr(at + 1, pattern)) {
        if (at > json && at[-1] == '\\')
            continue; /* inside another string */
        const char *start = at + strlen(pattern), *end = start;
        while (*end && *end != '"')
            end += (*end == '\\' && end[1]) ? 2 : 1;
        char *value = strndup(start, (size_t)(end - start));
        return value;
    }
    return NULL;
}

/* The text between <tag> and </tag> in xml, or NULL. */
static char *xml_text(const char *xml, const char *tag) {
    char open[64], close[64];
    snprintf(open, sizeof open, "<%s>", tag);
    snprintf(close, sizeof close, "</%s>", tag);
    const char *start = strstr(xml, open);
    if (!start)
        return NULL;
    start += strlen(open);
    const char *end = strstr(start, close);
    return end ? strndup(start, (size_t)(end - start)) : NULL;
}

/* A name safe as a file name and as JSON text. */
static int valid_name(const char *name) {
    return name && *name && *name != '.' && !strpbrk(name, "/\\\"<>&");
}

static void path_of(char *out, size_t size, struct connection *c, const char *a, const char *b, const char *ext) {
    snprintf(out, size, "%s/%s%s%s%s", c->root, a, b ? "/" : "", b ? b : "", ext ? ext : "");
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    struct buf b = {0};
    char chunk[4096];
    size_t n;
    buf_add(&b, "%s", "");
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        buf_add(&b, "%.*s", (int)n, chunk);
    fclose(f);
    return b.text;
}

static int write_file(const char *path, const char *text) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    for (char *slash = strchr(dir + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        mkdir(dir, 0755);
        *slash = '/';
    }
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fputs(text, f);
    return fclose(f);
}

static void emit(struct connection *c, const char *domain, const char *detail) {
    struct buf event = {0};
    buf_add(&event, "{\"domain\":\"%s\",\"event\":\"lifecycle\",\"detail\":\"%s\",\"disk\":null,\"timestamp_us\":%lld}",
            domain, detail, (long long)time(NULL) * 1000000LL);
    for (int i = 0; i < MAX_CALLBACKS; i++) {
        const StrataCallback *cb = c->callbacks[i];
        if (cb && cb->notify(cb, STRATA_NOTIFY_EVENT, (const uint8_t *)event.text, event.len) ==
                      STRATA_ERR_OPERATION_ABORTED)
            c->callbacks[i] = NULL; /* the host stopped listening */
    }
    free(event.text);
}

static void reply(struct buf *out, const char *result, const char *value) {
    if (value)
        buf_add(out, "{\"abi\":%d,\"reply\":{\"result\":\"%s\",\"value\":%s}}", STRATA_ABI_VERSION, result, value);
    else
        buf_add(out, "{\"abi\":%d,\"reply\":{\"result\":\"%s\"}}", STRATA_ABI_VERSION, result);
}

static void fail(struct buf *out, const char *kind, int code, const char *fmt, ...) {
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    buf_add(out, "{\"abi\":%d,\"error\":{\"kind\":\"%s\",\"code\":%d,\"message\":\"%s\"}}", STRATA_ABI_VERSION, kind,
            code, message);
}

static int is_running(struct connection *c, const char *name) {
    char path[4096];
    path_of(path, sizeof path, c, "running", name, NULL);
    return access(path, F_OK) == 0;
}

static void summary(struct buf *out, struct connection *c, const char *name, const char *xml) {
    char *uuid = xml_text(xml, "uuid");
    int running = is_running(c, name);
    buf_add(out, "\"id\":%s,\"name\":\"%s\",\"uuid\":\"%s\",\"state\":\"%s\",\"reason\":\"%s\",\"persistent\":true",
            running ? "1" : "null", name, uuid ? uuid : "", running ? "running" : "shutoff",
            running ? "booted" : "unknown");
    free(uuid);
}

/* The domain's stored (escaped) XML, or NULL after answering no-domain. */
static char *domain_xml(struct buf *out, struct connection *c, const char *name) {
    char path[4096];
    path_of(path, sizeof path, c, "domains", name, ".xml");
    char *xml = valid_name(name) ? read_file(path) : NULL;
    if (!xml)
        fail(out, "no-domain", STRATA_ERR_NO_DOMAIN, "no domain with matching name '%s'", valid_name(name) ? name : "");
    return xml;
}

/* Whether the domain's XML has a disk with target dev `disk` (quoted either way). */
static int has_disk(const char *xml, const char *disk) {
    char single[256], escaped[256];
    snprintf(single, sizeof single, "dev='%s'", disk);
    snprintf(escaped, sizeof escaped, "dev=\\\"%s\\\"", disk);
    return strstr(xml, single) || strstr(xml, escaped);
}

/* The domain's disk set: one target per line in disksets/NAME. */
static char *diskset(struct connection *c, const char *name) {
    char path[4096];
    path_of(path, sizeof path, c, "disksets", name, NULL);
    char *set = read_file(path);
    return set ? set : strdup("");
}

static int in_set(const char *set, const char *disk) {
    size_t n = strlen(disk);
    for (const char *line = set; *line; line = strchr(line, '\n') + 1) {
        if (strncmp(line, disk, n) == 0 && line[n] == '\n')
            return 1;
        if (!strchr(line, '\n'))
            break;
    }
    return 0;
}

/* The next file name in d ending with suffix, without it, into name; 0 at the end. */
static int next_named(DIR *d, const char *suffix, char *name, size_t size) {
    struct dirent *e;
    size_t cut = strlen(suffix);
    while (d && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n > cut && strcmp(e->d_name + n - cut, suffix) == 0) {
            snprintf(name, size, "%.*s", (int)(n - cut), e->d_name);
            return 1;
        }
    }
    return 0;
}

static void list_domains(struct buf *out, struct connection *c) {
    char dir[4096], name[256];
    path_of(dir, sizeof dir, c, "domains", NULL, NULL);
    struct buf list = {0};
    buf_add(&list, "[");
    DIR *d = opendir(dir);
    int first = 1;
    while (next_named(d, ".xml", name, sizeof name)) {
        struct buf ignored = {0};
        char *xml = domain_xml(&ignored, c, name);
        free(ignored.text);
        if (!xml)
            continue;
        buf_add(&list, "%s{", first ? "" : ",");
        summary(&list, c, name, xml);
        buf_add(&list, "}");
        first = 0;
        free(xml);
    }
    if (d)
        closedir(d);
    buf_add(&list, "]");
    reply(out, "domains", list.text);
    free(list.text);
}

static void perform(struct buf *out, struct connection *c, const char *method, const char *request) {
    char *domain = json_string(request, "domain");
    char *xml = NULL, *stored = NULL, *name = NULL, *set = NULL;
    char path[4096], other[4096];

    if (strcmp(method, "list_domains") == 0) {
        list_domains(out, c);
    } else if (strcmp(method, "define_xml") == 0) {
        xml = json_string(request, "xml");
        name = xml ? xml_text(xml, "name") : NULL;
        if (!valid_name(name)) {
            fail(out, "xml-error", 27, "the domain XML has no usable <name>");
        } else {
            path_of(path, sizeof path, c, "domains", name, ".xml");
            write_file(path, xml);
            emit(c, name, "Defined Added");
            struct buf value = {0};
            buf_add(&value, "{\"name\":\"%s\",\"warnings\":[]}", name);
            reply(out, "defined", value.text);
            free(value.text);
        }
    } else if (!(stored = domain_xml(out, c, domain))) {
        /* every other call names a domain; the no-domain error is written */
    } else if (strcmp(method, "domain_info") == 0) {
        struct buf value = {0};
        buf_add(&value, "{");
        summary(&value, c, domain, stored);
        buf_add(&value, ",\"os_type\":\"hvm\",\"max_memory_kib\":0,\"used_memory_kib\":0,\"vcpus\":1,"
                        "\"autostart\":false,\"managed_save\":false}");
        reply(out, "domain_info", value.text);
        free(value.text);
    } else if (strcmp(method, "dump_xml") == 0) {
        struct buf value = {0};
        buf_add(&value, "\"%s\"", stored);
        reply(out, "text", value.text);
        free(value.text);
    } else if (strcmp(method, "undefine") == 0) {
        path_of(path, sizeof path, c, "domains", domain, ".xml");
        unlink(path);
        emit(c, domain, "Undefined Removed");
        reply(out, "done", NULL);
    } else if (strcmp(method, "start") == 0 || strcmp(method, "destroy") == 0) {
        int start = method[0] == 's';
        path_of(path, sizeof path, c, "running", domain, NULL);
        if (start == is_running(c, domain)) {
            fail(out, "operation-invalid", STRATA_ERR_OPERATION_INVALID,
                  start ? "domain '%s' is already active" : "domain '%s' is not running", domain);
        } else {
            if (start)
                write_file(path, "");
            else
                unlink(path);
            emit(c, domain, start ? "Started Booted" : "Stopped Destroyed");
            reply(out, start ? "started" : "done", start ? "{\"warnings\":[]}" : NULL);
        }
    } else if (strcmp(method, "snapshot_create") == 0) {
        xml = json_string(request, "xml");
        name = xml ? xml_text(xml, "name") : NULL;
        if (!name) {
            name = malloc(32);
            snprintf(name, 32, "%lld", (long long)time(NULL));
        }
        path_of(other, sizeof other, c, "snapshots", domain, "/current");
        char *parent = read_file(other);
        char meta[512];
        snprintf(meta, sizeof meta, "%lld %s %s", (long long)time(NULL), is_running(c, domain) ? "running" : "shutoff",
                 parent ? parent : "");
        free(parent);
        snprintf(path, sizeof path, "%s/snapshots/%s/%s.xml", c->root, domain, valid_name(name) ? name : "");
        if (!valid_name(name)) {
            fail(out, "invalid-arg", STRATA_ERR_INVALID_ARG, "the snapshot name is not valid");
        } else if (access(path, F_OK) == 0) {
            fail(out, "operation-invalid", STRATA_ERR_OPERATION_INVALID, "snapshot '%s' already exists", name);
        } else {
            write_file(path, stored);
            snprintf(path, sizeof path, "%s/snapshots/%s/%s.meta", c->root, domain, name);
            write_file(path, meta);
            write_file(other, name);
            struct buf value = {0};
            buf_add(&value, "\"%s\"", name);
            reply(out, "text", value.text);
            free(value.text);
        }
    } else if (strcmp(method, "snapshot_list") == 0) {
        path_of(path, sizeof path, c, "snapshots", domain, NULL);
        path_of(other, sizeof other, c, "snapshots", domain, "/current");
        char *current = read_file(other);
        struct buf list = {0};
        buf_add(&list, "[");
        DIR *d = opendir(path);
        int first = 1;
        char snapshot[256];
        while (next_named(d, ".meta", snapshot, sizeof snapshot)) {
            char file[sizeof path + sizeof snapshot + 8];
            snprintf(file, sizeof file, "%s/%s.meta", path, snapshot);
            char *meta = read_file(file);
            long long when = 0;
            char state[32] = "", parent[256] = "";
            if (meta)
                sscanf(meta, "%lld %31s %255s", &when, state, parent);
            free(meta);
            buf_add(&list, "%s{\"name\":\"%s\",\"parent\":", first ? "" : ",", snapshot);
            buf_add(&list, *parent ? "\"%s\"" : "null", parent);
            buf_add(&list, ",\"creation_time\":%lld,\"state\":\"%s\",\"current\":%s,\"location\":\"internal\"}", when,
                    state, current && strcmp(current, snapshot) == 0 ? "true" : "false");
            first = 0;
        }
        if (d)
            closedir(d);
        buf_add(&list, "]");
        reply(out, "snapshots", list.text);
        free(list.text);
        free(current);
    } else if (strcmp(method, "snapshot_revert") == 0) {
        name = json_string(request, "snapshot");
        snprintf(path, sizeof path, "%s/snapshots/%s/%s.xml", c->root, domain, valid_name(name) ? name : "");
        char *saved = valid_name(name) ? read_file(path) : NULL;
        if (!saved) {
            fail(out, "no-domain-snapshot", STRATA_ERR_NO_DOMAIN_SNAPSHOT,
                  "no domain snapshot with matching name '%s'", valid_name(name) ? name : "");
        } else {
            path_of(path, sizeof path, c, "domains", domain, ".xml");
            write_file(path, saved);
            path_of(path, sizeof path, c, "snapshots", domain, "/current");
            write_file(path, name);
            emit(c, domain, "Snapshot reverted");
            reply(out, "done", NULL);
            free(saved);
        }
    } else if (strncmp(method, "diskset_", 8) == 0 && strcmp(method, "diskset_add_all") != 0) {
        char *disk = json_string(request, "disk");
        set = diskset(c, domain);
        path_of(path, sizeof path, c, "disksets", domain, NULL);
        if (strcmp(method, "diskset_list") == 0 || strcmp(method, "diskset_size") == 0) {
            struct buf value = {0};
            int count = 0;
            buf_add(&value, "[");
            for (char *line = strtok(set, "\n"); line; line = strtok(NULL, "\n"))
                buf_add(&value, "%s\"%s\"", count++ ? "," : "", line);
            buf_add(&value, "]");
            if (method[8] == 'l') {
                reply(out, "lines", value.text);
            } else {
                char number[32];
                snprintf(number, sizeof number, "%d", count);
                reply(out, "count", number);
            }
            free(value.text);
        } else if (strcmp(method, "diskset_remove_all") == 0) {
            int count = 0;
            for (char *line = set; (line = strchr(line, '\n')); line++)
                count++;
            write_file(path, "");
            char number[32];
            snprintf(number, sizeof number, "%d", count);
            reply(out, "count", number);
        } else if (!valid_name(disk) || !has_disk(stored, disk)) {
            fail(out, "invalid-arg", STRATA_ERR_INVALID_ARG, "domain '%s' has no disk '%s'", domain,
                  valid_name(disk) ? disk : "");
        } else {
            int add = strcmp(method, "diskset_add") == 0, present = in_set(set, disk);
            struct buf changed = {0};
            buf_add(&changed, "%s", "");
            for (char *line = strtok(set, "\n"); line; line = strtok(NULL, "\n"))
                if (strcmp(line, disk) != 0)
                    buf_add(&changed, "%s\n", line);
            if (add)
                buf_add(&changed, "%s\n", disk);
            write_file(path, changed.text);
            free(changed.text);
            reply(out, "disk_set_outcome",
                  add ? (present ? "\"already-present\"" : "\"added\"") : (present ? "\"removed\"" : "\"already-absent\""));
        }
        free(disk);
    } else {
        fail(out, "no-support", STRATA_ERR_NO_SUPPORT, "the examplec driver does not support %s", method);
    }
    free(domain);
    free(xml);
    free(stored);
    free(name);
    free(set);
}

static int32_t examplec_open(const char *uri, void **handle, StrataBytes *err) {
    struct connection *c = calloc(1, sizeof *c);
    const char *root = strstr(uri, "root=");
    struct buf message = {0};
    if (!c) {
        buf_add(&message, "out of memory");
        *err = buf_bytes(&message);
        return STRATA_ERR_INTERNAL;
    }
    if (root)
        snprintf(c->root, sizeof c->root, "%.*s", (int)strcspn(root + 5, "&"), root + 5);
    else if (getenv("STRATA_EXAMPLE_STATE"))
        snprintf(c->root, sizeof c->root, "%s", getenv("STRATA_EXAMPLE_STATE"));
    if (!c->root[0]) {
        free(c);
        buf_add(&message, "the examplec driver needs a state directory: root=DIR in '%s' or $STRATA_EXAMPLE_STATE",
                uri);
        *err = buf_bytes(&message);
        return STRATA_ERR_INVALID_ARG;
    }
    snprintf(c->uri, sizeof c->uri, "%s", uri);
    pthread_mutex_init(&c->lock, NULL);
    *handle = c;
    return STRATA_OK;
}

static int32_t examplec_call(void *handle, uint64_t call_id, const uint8_t *request, size_t len,
                             StrataBytes *response) {
    struct connection *c = handle;
    struct buf out = {0};
    char *text = strndup((const char *)request, len);
    char *method = text ? json_string(text, "method") : NULL;
    (void)call_id;
    if (!text || strstr(text, "{\"abi\":") != text || atoi(text + 7) != STRATA_ABI_VERSION) {
        fail(&out, "argument-unsupported", STRATA_ERR_ARGUMENT_UNSUPPORTED,
              "the examplec driver reads requests of ABI version %d only", STRATA_ABI_VERSION);
    } else if (!method) {
        fail(&out, "invalid-arg", STRATA_ERR_INVALID_ARG, "the request names no method");
    } else {
        pthread_mutex_lock(&c->lock);
        perform(&out, c, method, text);
        pthread_mutex_unlock(&c->lock);
    }
    free(method);
    free(text);
    *response = buf_bytes(&out);
    return STRATA_OK;
}

static void examplec_free_bytes(StrataBytes bytes) {
    free(bytes.ptr);
}

static int32_t examplec_cancel(void *handle, uint64_t call_id) {
    (void)handle;
    (void)call_id;
    return STRATA_ERR_OPERATION_INVALID; /* no call runs long enough */
}

static int32_t examplec_register(void *handle, const StrataCallback *callback, uint32_t kinds) {
    struct connection *c = handle;
    int32_t status = STRATA_ERR_INVALID_ARG;
    if (kinds != STRATA_NOTIFY_EVENT)
        return status;
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < MAX_CALLBACKS; i++) {
        if (!c->callbacks[i]) {
            c->callbacks[i] = callback;
            status = STRATA_OK;
            break;
        }
    }
    pthread_mutex_unlock(&c->lock);
    return status;
}

static int32_t examplec_unregister(void *handle, const StrataCallback *callback) {
    struct connection *c = handle;
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < MAX_CALLBACKS; i++)
        if (c->callbacks[i] == callback)
            c->callbacks[i] = NULL;
    pthread_mutex_unlock(&c->lock);
    if (getenv("STRATA_EXAMPLEC_NOTIFY_AFTER_STOP")) {
        static const char event[] = "{\"domain\":\"late\",\"event\":\"lifecycle\",\"detail\":\"Too late\","
                                    "\"disk\":null,\"timestamp_us\":0}";
        int32_t status = callback->notify(callback, STRATA_NOTIFY_EVENT, (const uint8_t *)event, sizeof event - 1);
        fprintf(stderr, "examplec: notified after being told to stop; the host answered %d\n", status);
    }
    return STRATA_OK;
}

static void examplec_close(void *handle) {
    struct connection *c = handle;
    pthread_mutex_destroy(&c->lock);
    free(c);
}

static const char *const schemes[] = {EXAMPLEC_SCHEME, NULL};

static const StrataDriverV1 table = {
    .abi_version = EXAMPLEC_ABI_VERSION,
    .name = "examplec",
    .schemes = schemes,
    .capabilities_json =
        "{\"driver\":\"examplec\",\"uri\":\"examplec:///\",\"hypervisor\":\"none (an example plugin in C)\","
        "\"domains\":{\"run\":true,\"events\":true,\"vcpu_info\":false,\"monitor\":false,\"cpu_placement\":false,"
        "\"vcpu_hotplug\":false},"
        "\"snapshots\":{\"kinds\":{\"internal_disk\":true,\"external_disk\":false,\"internal_memory\":false,"
        "\"external_memory\":false},\"creation\":{\"live\":false,\"offline\":true},"
        "\"revert\":{\"to\":\"any-snapshot\",\"external\":false,\"guest\":\"stopped-only\"},"
        "\"delete\":{\"internal\":false,\"external_by_commit\":false,\"external_by_pull\":false,"
        "\"metadata_only\":false,\"children\":false}},"
        "\"block_jobs\":{\"kinds\":{\"pull\":false,\"intermediate_commit\":false,\"active_commit\":false,"
        "\"copy\":false},\"copy\":{\"shallow\":false,\"raw\":false,\"reuse_external\":false},"
        "\"bandwidth\":false,\"ready_pivot\":false},"
        "\"storage\":{\"disk_sets\":true,\"storage_pools\":false},"
        "\"honoured_elements\":[],\"unhonoured_elements\":[],\"notes\":[]}",
    .open = examplec_open,
    .call = examplec_call,
    .free_bytes = examplec_free_bytes,
    .cancel = examplec_cancel,
    .register_callback = examplec_register,
    .unregister_callback = examplec_unregister,
    .close = examplec_close,
};

const StrataDriverV1 *strata_driver_entry(void) {
    return &table;
}
