/* Strata driver plugin ABI (docs/plugins.md). SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A plugin is a shared library that exports one function,
 *     const StrataDriverV1 *strata_driver_entry(void);
 * returning its table; everything else crosses through the table. */

#ifndef STRATA_DRIVER_H
#define STRATA_DRIVER_H

/* Generated from sdk/abi/src/lib.rs by cbindgen (sdk/abi/tests/header.rs); do not edit. */

#include <stddef.h>
#include <stdint.h>

/*
 The version of this table and of the wire messages that cross it.
 */
#define STRATA_ABI_VERSION 1

/*
 Success.
 */
#define STRATA_OK 0

/*
 Strata's `internal-error` (VIR_ERR_INTERNAL_ERROR): a plugin's bug, such as a panic.
 */
#define STRATA_ERR_INTERNAL 1

/*
 Strata's `no-support` (VIR_ERR_NO_SUPPORT): the driver does not do this.
 */
#define STRATA_ERR_NO_SUPPORT 3

/*
 Strata's `invalid-arg` (VIR_ERR_INVALID_ARG): a bad URI, request or flag.
 */
#define STRATA_ERR_INVALID_ARG 8

/*
 Strata's `operation-failed` (VIR_ERR_OPERATION_FAILED).
 */
#define STRATA_ERR_OPERATION_FAILED 9

/*
 Strata's `no-domain` (VIR_ERR_NO_DOMAIN).
 */
#define STRATA_ERR_NO_DOMAIN 42

/*
 Strata's `operation-invalid` (VIR_ERR_OPERATION_INVALID).
 */
#define STRATA_ERR_OPERATION_INVALID 55

/*
 Strata's `no-domain-snapshot` (VIR_ERR_NO_DOMAIN_SNAPSHOT).
 */
#define STRATA_ERR_NO_DOMAIN_SNAPSHOT 72

/*
 Strata's `argument-unsupported` (VIR_ERR_ARGUMENT_UNSUPPORTED): another ABI version.
 */
#define STRATA_ERR_ARGUMENT_UNSUPPORTED 74

/*
 Strata's `operation-aborted` (VIR_ERR_OPERATION_ABORTED): a cancelled
 call, or a notification through a callback the host has stopped.
 */
#define STRATA_ERR_OPERATION_ABORTED 78

/*
 A notification kind bit: a domain event, its data a JSON
 `strata_core::driver::DomainEvent`. (Block-job progress is not pushed:
 the host asks for it with the `block_job_wait` call.)
 */
#define STRATA_NOTIFY_EVENT (1 << 0)

/*
 Bytes one side allocated: a request, a response, an error message.
 */
typedef struct StrataBytes {
  uint8_t *ptr;
  size_t len;
} StrataBytes;

/*
 A callback record, allocated by the host and valid for the life of the
 process. The plugin calls `notify(callback, kind, data, len)` from any
 thread; `data` is the plugin's and is not kept by the host. `notify`
 returns [`STRATA_OK`], or [`STRATA_ERR_OPERATION_ABORTED`] once the host
 has stopped the record (the plugin should forget it), or
 [`STRATA_ERR_INVALID_ARG`] for data it cannot read.
 */
typedef struct StrataCallback {
  int32_t (*notify)(const struct StrataCallback *callback, uint32_t kind, const uint8_t *data, size_t len);
  /*
   The host's; the plugin passes the record back unchanged.
   */
  void *context;
} StrataCallback;

/*
 What [`STRATA_DRIVER_ENTRY_SYMBOL`] returns, version 1. Strings are NUL-terminated
 UTF-8 and, like the table, valid for the life of the process. Every
 function may be called from any thread, several at once.
 */
typedef struct StrataDriverV1 {
  /*
   [`STRATA_ABI_VERSION`] as the plugin was built with it; always the first field.
   */
  uint32_t abi_version;
  /*
   The driver's name (`example`), as `capabilities` shows it.
   */
  const char *name;
  /*
   The URI schemes it serves, a NULL-terminated array (`example`).
   */
  const char *const *schemes;
  /*
   Its `strata_core::capabilities::DriverCapabilities` as JSON.
   */
  const char *capabilities_json;
  /*
   Opens a connection to `uri`; on success sets `*handle`. On failure
   returns an error code and may set `*error` to a message.
   */
  int32_t (*open)(const char *uri, void **handle, struct StrataBytes *error);
  /*
   Performs one JSON request and sets `*response` to the JSON response
   (which may carry the call's error); returns [`STRATA_OK`]. Another
   result means no response was made, with a message in `*response`.
   `call_id` is the host's number for the call, unique per handle.
   */
  int32_t (*call)(void *handle, uint64_t call_id, const uint8_t *request, size_t request_len, struct StrataBytes *response);
  /*
   Frees bytes this plugin returned.
   */
  void (*free_bytes)(struct StrataBytes bytes);
  /*
   Asks the call `call_id`, running on another thread, to end early
   (its response is then an `operation-aborted` error). Returns
   [`STRATA_OK`], or an error code when no such call runs.
   */
  int32_t (*cancel)(void *handle, uint64_t call_id);
  /*
   Starts notifications of the `kinds` bits ([`STRATA_NOTIFY_EVENT`])
   through `callback`, a host record the plugin may keep.
   */
  int32_t (*register_callback)(void *handle, const struct StrataCallback *callback, uint32_t kinds);
  /*
   Tells the plugin, synchronously, to stop notifying through
   `callback`; the host has already marked it stopped.
   */
  int32_t (*unregister_callback)(void *handle, const struct StrataCallback *callback);
  /*
   Ends the connection; no call runs on it any more.
   */
  void (*close)(void *handle);
} StrataDriverV1;

/*
 The type of [`STRATA_DRIVER_ENTRY_SYMBOL`].
 */
typedef const struct StrataDriverV1 *(*StrataDriverEntry)(void);

#endif  /* STRATA_DRIVER_H */
