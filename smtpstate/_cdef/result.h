/*
 * cffi cdef for include/smtpstate.h: results, one per submitted message.
 */

enum smtps_status {
    SMTPS_STATUS_DELIVERED = 1,
    SMTPS_STATUS_TEMPFAIL = 2,
    SMTPS_STATUS_PERMFAIL = 3,
    SMTPS_STATUS_UNKNOWN = 4,
    SMTPS_STATUS_PARTIAL = 6,
    SMTPS_STATUS_NOT_SENT = 7
};

#define SMTPS_RCPT_PENDING ...
#define SMTPS_RCPT_ACCEPTED ...

struct smtps_result_reply {
    int code;
    char enhanced[16];
    char *text;
};

struct smtps_result_rcpt {
    int status;
    struct smtps_result_reply reply;
    int bounce_class;
    int route;
    char enhanced[16];
};

#define SMTPS_RESULT_HOST_MAX ...
struct smtps_result_route {
    char mx[...];
    char ip[...];
};

struct smtps_result {
    uint64_t tag;
    int status;
    int state;
    int stage;
    char stage_name[64];
    struct smtps_result_reply reply;
    char *reason;
    size_t nrcpt;
    struct smtps_result_rcpt *rcpt;
    struct smtps_result *next;
    int bounce_class;
    size_t nroute;
    struct smtps_result_route *route;
    void *owner;
    char enhanced[16];
};

void smtps_result_free(struct smtps_result *r);
