/*
** Private glue between the kernel sources (registry.c, squares.c, http.c).
** Nothing outside src/kernels/ should need this header: the public surface
** is kernel.h.
*/
#ifndef LUAPOOL_KERNELS_INTERNAL_H
#define LUAPOOL_KERNELS_INTERNAL_H

#include <curl/curl.h>

#include "kernels/kernel.h"

/* Native bodies, listed in luapool__kernels by registry.c (which also holds
** their Lua faces: those are one-liners over luapool__kernel_call_lua). */
int luapool__sum_squares_run(lp_kcall *c);
int luapool__fetch_length_run(lp_kcall *c);

/* fetch_length's Lua face on an engine's loop thread (http.c): the same
** checks and results as the kernel's, but it yields the request as
** http.request does there (httploop.h: luapool__http_set_thread_loop).
** For registry.c's l_fetch_length, first thing:
**     if (luapool__http_thread_loop()) return luapool__http_fetch_length_yield(L); */
int luapool__http_fetch_length_yield(lua_State *L);

/* "bad argument #N to 'NAME' (DETAIL)" for details that are not of the
** "X expected, got TYPE" shape (e.g. "non-negative integer expected, got -5"). */
int luapool__kargmsg(lp_kcall *c, const char *kname, int arg, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Writes a number the way Lua's tostring does (integers as "%lld", floats
** as "%.14g" plus ".0" when that looks like an integer); returns buf. */
const char *luapool__knumfmt(const lp_value *v, char *buf, size_t size);

/* libcurl's functions, loaded by luapool__http_global_init (http.c, which
** fills it once inside a pthread_once) and read by http.c and httploop.c
** only after that returned 0. */
typedef struct lp_curl_api {
  CURLcode (*global_init)(long);
  curl_version_info_data *(*version_info)(CURLversion);
  CURL *(*easy_init)(void);
  void (*easy_cleanup)(CURL *);
  void (*easy_reset)(CURL *);
  CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
  CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
  const char *(*easy_strerror)(CURLcode);
  CURLM *(*multi_init)(void);
  CURLMcode (*multi_cleanup)(CURLM *);
  CURLMcode (*multi_setopt)(CURLM *, CURLMoption, ...);
  CURLMcode (*multi_add_handle)(CURLM *, CURL *);
  CURLMcode (*multi_remove_handle)(CURLM *, CURL *);
  CURLMcode (*multi_socket_action)(CURLM *, curl_socket_t, int, int *);
  CURLMsg *(*multi_info_read)(CURLM *, int *);
  struct curl_slist *(*slist_append)(struct curl_slist *, const char *);
  void (*slist_free_all)(struct curl_slist *);
  CURLU *(*url)(void);
  void (*url_cleanup)(CURLU *);
  CURLUcode (*url_set)(CURLU *, CURLUPart, const char *, unsigned int);
  CURLUcode (*url_get)(const CURLU *, CURLUPart, char **, unsigned int);
  void (*free)(void *);
  time_t (*getdate)(const char *, const time_t *);
  const char *(*url_strerror)(CURLUcode); /* NULL before libcurl 7.80 */
} lp_curl_api;
extern lp_curl_api luapool__lc;

#endif
