/*
 * cffi cdef for include/smtpstate.h: the sans-I/O session. struct
 * smtps_session itself is opaque (declared in machine.h).
 */

enum smtps_session_status {
    SMTPS_SESS_NEW = 0,
    SMTPS_SESS_ACTIVE = 1,
    SMTPS_SESS_IDLE = 2,
    SMTPS_SESS_CLOSING = 3,
    SMTPS_SESS_CLOSED = 4
};

#define SMTPS_TIMEOUT_BANNER ...
#define SMTPS_TIMEOUT_MAIL ...
#define SMTPS_TIMEOUT_RCPT ...
#define SMTPS_TIMEOUT_DATA ...
#define SMTPS_TIMEOUT_BLOCK ...
#define SMTPS_TIMEOUT_FINAL ...
#define SMTPS_TIMEOUT_OTHER ...
#define SMTPS_TIMEOUT_MAX ...

#define SMTPS_HELO_MAX ...
#define SMTPS_LINE_MAX ...

struct smtps_session *smtps_session_new(struct smtps_machine *m,
                                        const char *helo, void *user);
void smtps_session_free(struct smtps_session *s);
int smtps_session_set_timeout(struct smtps_session *s, int state_id,
                              int64_t ms);

int smtps_session_start(struct smtps_session *s, int64_t now);
int smtps_session_feed(struct smtps_session *s, const char *data, size_t len,
                       int64_t now);
size_t smtps_session_output(struct smtps_session *s, const char **data);
void smtps_session_consume(struct smtps_session *s, size_t n, int64_t now);
int64_t smtps_session_deadline(const struct smtps_session *s);
int smtps_session_tick(struct smtps_session *s, int64_t now);
void smtps_session_closed(struct smtps_session *s, const char *why,
                          int64_t now);
int smtps_session_status(const struct smtps_session *s);

int smtps_session_submit(struct smtps_session *s, struct smtps_message *msg,
                         uint64_t tag, int64_t now);
int smtps_session_quit(struct smtps_session *s, int64_t now);
size_t smtps_session_pending(const struct smtps_session *s);
struct smtps_result *smtps_session_next_result(struct smtps_session *s);
unsigned smtps_session_transactions(const struct smtps_session *s);
int smtps_session_dispatching(const struct smtps_session *s);
int smtps_session_interrupted(const struct smtps_session *s);

int smtps_session_send_line(struct smtps_session *s, const char *line,
                            size_t len);
const struct smtps_caps *smtps_session_caps(const struct smtps_session *s);
int smtps_session_pipelining(const struct smtps_session *s);
const struct smtps_message *smtps_session_message(const struct smtps_session *s);
void *smtps_session_user(const struct smtps_session *s);
void smtps_session_set_user(struct smtps_session *s, void *user);
#define SMTPS_ADDRESS_TEXT_MAX ...
int smtps_session_set_addresses(struct smtps_session *s, const char *peer,
                                int peer_port, const char *local,
                                int local_port);
const char *smtps_session_peer(const struct smtps_session *s, int *port);
const char *smtps_session_local_address(const struct smtps_session *s,
                                        int *port);
void *smtps_session_local(const struct smtps_session *s, int state_id);
int smtps_session_state(const struct smtps_session *s);
size_t smtps_session_reply_index(const struct smtps_session *s);
int smtps_session_set_reason(struct smtps_session *s, const char *text);
const char *smtps_session_reason(const struct smtps_session *s);
int smtps_session_rcpt_index(const struct smtps_session *s);
int smtps_session_set_rcpt_result(struct smtps_session *s, size_t i,
                                  const struct smtps_reply *reply);

#define SMTPS_TRACE_SENT ...
#define SMTPS_TRACE_RECEIVED ...
#define SMTPS_TRACE_DATA ...
#define SMTPS_TRACE_NOTE ...

typedef void (*SMTPSTrace)(struct smtps_session *session, int kind,
                           const char *data, size_t len, void *closure);

int smtps_session_set_trace(struct smtps_session *s, SMTPSTrace fn,
                            void *closure);

/* SMTPS_PROTOCOLS(X), in order */
enum smtps_protocol {
    SMTPS_PROTO_SMTP = 0,
    SMTPS_PROTO_LMTP = 1,
    SMTPS_PROTO__COUNT = 2
};

const char *smtps_protocol_name(int protocol);
int smtps_session_set_protocol(struct smtps_session *s, int protocol);
int smtps_session_protocol(const struct smtps_session *s);
