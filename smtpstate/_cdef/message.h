/*
 * cffi cdef for include/smtpstate.h: messages (envelope and body).
 */

#define SMTPS_DSN_RET_NONE ...
#define SMTPS_DSN_RET_FULL ...
#define SMTPS_DSN_RET_HDRS ...

#define SMTPS_NOTIFY_NEVER ...
#define SMTPS_NOTIFY_SUCCESS ...
#define SMTPS_NOTIFY_FAILURE ...
#define SMTPS_NOTIFY_DELAY ...

#define SMTPS_ADDRESS_MAX ...
#define SMTPS_MAX_RECIPIENTS ...

struct smtps_message;

struct smtps_message *smtps_message_new(void);
void smtps_message_free(struct smtps_message *m);
int smtps_message_set_sender(struct smtps_message *m, const char *addr,
                             size_t len);
int smtps_message_add_recipient(struct smtps_message *m, const char *addr,
                                size_t len, unsigned notify,
                                const char *orcpt, size_t orcpt_len);
typedef long (*SMTPSBodyRead) (void *closure, uint64_t offset, char *buf,
                               size_t cap, char *why, size_t why_cap);

int smtps_message_set_body_options(struct smtps_message *m, unsigned flags);
int smtps_message_set_body(struct smtps_message *m, const char *data,
                           size_t len);
int smtps_message_set_body_ref(struct smtps_message *m, const char *data,
                               size_t len);
int smtps_message_set_body_fixed(struct smtps_message *m, const char *data,
                                 size_t len);
int smtps_message_set_body_source(struct smtps_message *m, SMTPSBodyRead read,
                                  void *closure, int64_t size, int is_8bit);
int smtps_message_set_dsn(struct smtps_message *m, int ret,
                          const char *envid, size_t envid_len);
int smtps_message_set_require_tls(struct smtps_message *m, int require);
int smtps_message_require_tls(const struct smtps_message *m);
int smtps_message_set_smtputf8(struct smtps_message *m, int on);
const char *smtps_message_sender(const struct smtps_message *m);
size_t smtps_message_recipient_count(const struct smtps_message *m);
const char *smtps_message_recipient(const struct smtps_message *m, size_t i);
uint64_t smtps_message_size(const struct smtps_message *m);
uint64_t smtps_message_tag(const struct smtps_message *m);
int smtps_message_check_plain(const char *sender, size_t sender_len,
                              const char *rcpts, size_t rcpts_len,
                              size_t nrcpt, const char *body, size_t body_len);
struct smtps_message *smtps_message_copy(const struct smtps_message *envelope,
                                         const char *body, size_t len);
