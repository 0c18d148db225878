/*
 * cffi cdef for include/smtpstate.h: callback actions, built-in states
 * and connection stages. cdef cannot expand the header's X-macros, so
 * the enums are written out here in the macro order; the compiler checks
 * every value against the real header.
 */

enum smtps_action {
    SMTPS_ACT_ERROR = 0,
    SMTPS_ACT_NEXT = 1,
    SMTPS_ACT_JUMP = 2,
    SMTPS_ACT_RETRY = 3,
    SMTPS_ACT_TEMPFAIL_TX = 4,
    SMTPS_ACT_PERMFAIL_TX = 5,
    SMTPS_ACT_FAIL_CONN = 6,
    SMTPS_ACT_ABORT = 7
};

/* SMTPS_BUILTIN_STATES(X), in order */
enum smtps_builtin_state {
    SMTPS_STATE_BANNER = 0,
    SMTPS_STATE_EHLO = 1,
    SMTPS_STATE_STARTTLS = 2,
    SMTPS_STATE_AUTH = 3,
    SMTPS_STATE_MAIL = 4,
    SMTPS_STATE_RCPT = 5,
    SMTPS_STATE_DATA = 6,
    SMTPS_STATE_BODY = 7,
    SMTPS_STATE_RSET = 8,
    SMTPS_STATE_QUIT = 9,
    SMTPS_STATE__COUNT = 10
};

#define SMTPS_MAX_STATES ...
#define SMTPS_STATE_NAME_MAX ...

/* SMTPS_STAGES(X), in order */
enum smtps_stage {
    SMTPS_STAGE_NOT_CONNECTED = 0,
    SMTPS_STAGE_IDLE = 1,
    SMTPS_STAGE_MAIL = 2,
    SMTPS_STAGE_MAIL_DONE = 3,
    SMTPS_STAGE_RCPT = 4,
    SMTPS_STAGE_RCPT_DONE = 5,
    SMTPS_STAGE_DATA = 6,
    SMTPS_STAGE_DATA_DONE = 7,
    SMTPS_STAGE_BODY = 8,
    SMTPS_STAGE_CONFIRM = 9,
    SMTPS_STAGE_EHLO = 10,
    SMTPS_STAGE_EHLO_DONE = 11,
    SMTPS_STAGE_BANNER = 12,
    SMTPS_STAGE_RSET = 13,
    SMTPS_STAGE_RSET_DONE = 14,
    SMTPS_STAGE_STARTTLS = 15,
    SMTPS_STAGE_STARTTLS_DONE = 16,
    SMTPS_STAGE_TLS_HANDSHAKE = 17,
    SMTPS_STAGE_TLS_RENEGOTIATION = 18,
    SMTPS_STAGE_XCLIENT = 19,
    SMTPS_STAGE_XCLIENT_DONE = 20,
    SMTPS_STAGE_UNKNOWN = 22,
    SMTPS_STAGE_AUTH = 23,
    SMTPS_STAGE_AUTH_DONE = 24,
    SMTPS_STAGE_BEFORE_MAIL = 25,
    SMTPS_STAGE__COUNT = 26
};

const char *smtps_stage_name(int stage);
