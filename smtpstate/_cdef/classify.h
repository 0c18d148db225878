/*
 * cffi cdef for include/smtpstate.h: bounce classification (classify.c).
 * cdef cannot expand the header's SMTPS_BOUNCE_CLASSES X-macro, so the
 * enum is written out here in the macro order; the compiler checks every
 * value against the real header.
 */

enum smtps_bounce_class {
    SMTPS_BOUNCE_NONE = 0,
    SMTPS_BOUNCE_UNDETERMINED = 1,
    SMTPS_BOUNCE_INVALID_RECIPIENT = 10,
    SMTPS_BOUNCE_SOFT_BOUNCE = 20,
    SMTPS_BOUNCE_DNS_FAILURE = 21,
    SMTPS_BOUNCE_MAILBOX_FULL = 22,
    SMTPS_BOUNCE_TOO_LARGE = 23,
    SMTPS_BOUNCE_TIMEOUT = 24,
    SMTPS_BOUNCE_ADMIN_FAILURE = 25,
    SMTPS_BOUNCE_NO_RCPT = 30,
    SMTPS_BOUNCE_GENERIC_BOUNCE = 40,
    SMTPS_BOUNCE_MAIL_BLOCK = 50,
    SMTPS_BOUNCE_SPAM_BLOCK = 51,
    SMTPS_BOUNCE_SPAM_CONTENT = 52,
    SMTPS_BOUNCE_PROHIBITED_ATTACHMENT = 53,
    SMTPS_BOUNCE_RELAYING_DENIED = 54,
    SMTPS_BOUNCE_AUTO_REPLY = 60,
    SMTPS_BOUNCE_TRANSIENT_FAILURE = 70,
    SMTPS_BOUNCE_SUBSCRIBE = 80,
    SMTPS_BOUNCE_UNSUBSCRIBE = 90,
    SMTPS_BOUNCE_CHALLENGE_RESPONSE = 100,
    SMTPS_BOUNCE_CLASS_MAX = 999
};

#define SMTPS_BOUNCE_NAME_MAX ...
#define SMTPS_BOUNCE_USER_CLASSES ...
#define SMTPS_BOUNCE_USER_RULES ...

struct smtps_bounce_rule {
    size_t sizeof_bounce_rule;
    int bounce_class;
    int code;
    const char *enhanced;
    const char *text;
};

int smtps_bounce_classify(int code, const char *enhanced, const char *text,
                          size_t text_len);
int smtps_bounce_classify_reason(int status, const char *reason);
int smtps_bounce_local_enhanced(int status, const char *reason, char *out,
                                size_t cap);
void smtps_bounce_classify_result(struct smtps_result *r);
int smtps_bounce_class_name(int bounce_class, char *out, size_t cap);
int smtps_bounce_register_class(int code, const char *name);
int smtps_bounce_add_rule(const struct smtps_bounce_rule *rule);
void smtps_bounce_reset(void);
