/*
 * cffi cdef for include/smtpstate.h: the engine (many sessions, epoll).
 */

struct smtps_engine;

struct smtps_destination {
    size_t sizeof_destination;
    const char *host;
    int port;
    int tls_mode;
    struct smtps_tls_config *tls;
    const char *tls_servername;
    const char *auth_user;
    const char *auth_secret;
    unsigned auth_mechs;
    int auth_allow_plaintext;
    int64_t timeout_ms;
    const char *helo;
    int protocol;
    int source;
};

struct smtps_engine_config {
    size_t sizeof_config;
    int max_connections;
    int max_per_destination;
    int messages_per_connection;
    int64_t idle_timeout_ms;
    int64_t connect_timeout_ms;
    const char *helo;
    int mx_address_limit;
    int inet_protocols;
    int address_preference;
    int tls_no_resumption;
    int max_tls_handshakes;
};

#define SMTPS_INET_ALL ...
#define SMTPS_INET_IPV4 ...
#define SMTPS_INET_IPV6 ...

struct smtps_resolver_config {
    size_t sizeof_config;
    const char *const *nameservers;
    size_t nameservers_count;
    int hosts_file;
    int64_t timeout_ms;
    int attempts;
    const char *const *trust_anchors;
    size_t trust_anchors_count;
    const char *const *local_data;
    size_t local_data_count;
    int max_in_flight;
    int no_dnssec;
};

#define SMTPS_DNSSEC_UNKNOWN ...
#define SMTPS_DNSSEC_OFF ...
#define SMTPS_DNSSEC_ON ...
#define SMTPS_DNSSEC_STRIPPED ...
int smtps_engine_dnssec(const struct smtps_engine *e);

struct smtps_limits {
    const char *pattern;
    int connections;
    int messages_per_connection;
    double connection_rate;
    double message_rate;
};

struct smtps_source {
    const char *address;
    const char *helo;
};

struct smtps_engine *smtps_engine_new(struct smtps_machine *m,
                                      const struct smtps_engine_config *cfg,
                                      void *user);
void smtps_engine_free(struct smtps_engine *e);
int smtps_engine_submit(struct smtps_engine *e, struct smtps_message *msg,
                        const struct smtps_destination *dest, uint64_t tag);
int smtps_engine_run(struct smtps_engine *e, int64_t max_wait_ms);
struct smtps_result *smtps_engine_next_result(struct smtps_engine *e);
size_t smtps_engine_pending(const struct smtps_engine *e);
size_t smtps_engine_connections(const struct smtps_engine *e);
int smtps_engine_set_trace(struct smtps_engine *e, SMTPSTrace fn,
                           void *closure);
int smtps_engine_serve(struct smtps_engine *e, int64_t max_wait_ms);
int smtps_engine_fileno(const struct smtps_engine *e);
int64_t smtps_engine_next_deadline(const struct smtps_engine *e);
int smtps_engine_wake(struct smtps_engine *e);
#define SMTPS_CANCEL_DONE ...
#define SMTPS_CANCEL_PENDING ...
#define SMTPS_CANCEL_TOO_LATE ...
int smtps_engine_cancel(struct smtps_engine *e, uint64_t tag);
int smtps_engine_set_resolver(struct smtps_engine *e,
                              const struct smtps_resolver_config *cfg,
                              char *why, size_t whylen);
int smtps_engine_set_limits(struct smtps_engine *e,
                            const struct smtps_limits *limits, size_t n);
int smtps_engine_set_sources(struct smtps_engine *e,
                             const struct smtps_source *sources, size_t n,
                             char *why, size_t whylen);

/* Fast paths for drivers (batch.c). */
#define SMTPS_COLLECT_SLOTS ...
#define SMTPS_COLLECT_MAX ...

struct smtps_collector;

int smtps_engine_submit_copy(struct smtps_engine *e,
                             const struct smtps_message *envelope,
                             const char *body, size_t len,
                             const struct smtps_destination *dest,
                             uint64_t tag);
int smtps_engine_submit_plain(struct smtps_engine *e, const char *sender,
                             size_t slen, const char *rcpts, size_t rlen,
                             size_t nrcpt, const char *body, size_t len,
                             const struct smtps_destination *dest,
                             uint64_t tag);
struct smtps_collector *smtps_collector_new(void);
void smtps_collector_free(struct smtps_collector *c);
int smtps_engine_collect(struct smtps_engine *e, struct smtps_collector *c,
                         uint64_t *out, size_t max);
int smtps_engine_run_collect(struct smtps_engine *e, int64_t max_wait_ms,
                             struct smtps_collector *c, uint64_t *out,
                             size_t max);
int smtps_engine_serve_collect(struct smtps_engine *e, int64_t max_wait_ms,
                               struct smtps_collector *c, uint64_t *out,
                               size_t max);
const struct smtps_result *smtps_collector_shape(const struct smtps_collector *c,
                                                 size_t slot);
const struct smtps_result_reply *smtps_collector_reply(const struct smtps_collector *c,
                                                       size_t slot);

#define SMTPS_STS_NONE ...
#define SMTPS_STS_TESTING ...
#define SMTPS_STS_ENFORCE ...
int smtps_engine_set_sts_policy(struct smtps_engine *e, const char *domain,
                                int mode, const char *const *mx, size_t nmx);

struct smtps_tls_event {
    const char *domains;
    const char *mx_host;
    const char *mx_ip;
    const char *source_ip;
    const char *level;
    const char *policy;
    const char *tlsa;
    const char *result;
    const char *detail;
    const char *version;
    int verified;
    int resumed;
};
int smtps_engine_set_tls_events(struct smtps_engine *e, size_t max);
int smtps_engine_next_tls_event(struct smtps_engine *e, struct smtps_tls_event *ev);
uint64_t smtps_engine_tls_events_dropped(const struct smtps_engine *e);

struct smtps_lookup;
struct smtps_lookup *smtps_lookup_new(const struct smtps_resolver_config *cfg,
                                      char *why, size_t whylen);
int smtps_lookup_txt(struct smtps_lookup *l, const char *name, char *out,
                     size_t outlen);
int smtps_lookup_address(struct smtps_lookup *l, const char *name, char *out,
                         size_t outlen);
void smtps_lookup_free(struct smtps_lookup *l);
