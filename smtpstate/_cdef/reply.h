/*
 * cffi cdef for include/smtpstate.h: the reply parser and EHLO
 * capabilities. cdef cannot expand the header's X-macros, so the bit
 * enums are written out here in the macro order; the compiler checks
 * every value against the real header.
 */

#define SMTPS_REPLY_LINE_MAX ...
#define SMTPS_REPLY_MAX ...

struct smtps_reply {
    int code;
    char enhanced[16];
    const char *text;
    size_t text_len;
    size_t nlines;
};

struct smtps_reply_parser;

struct smtps_reply_parser *smtps_reply_parser_new(void);
void smtps_reply_parser_free(struct smtps_reply_parser *p);
int smtps_reply_parse(struct smtps_reply_parser *p, const char *data,
                      size_t len, size_t *consumed, struct smtps_reply *out);

/* SMTPS_EXTENSIONS(X), SMTPS_AUTH_MECHS(X), SMTPS_XCLIENT_ATTRS(X) */
enum smtps_extension {
    SMTPS_EXT_PIPELINING = 1,
    SMTPS_EXT_SIZE = 2,
    SMTPS_EXT_8BITMIME = 4,
    SMTPS_EXT_SMTPUTF8 = 8,
    SMTPS_EXT_STARTTLS = 16,
    SMTPS_EXT_AUTH = 32,
    SMTPS_EXT_DSN = 64,
    SMTPS_EXT_CHUNKING = 128,
    SMTPS_EXT_ENHANCEDSTATUSCODES = 256,
    SMTPS_EXT_XCLIENT = 512,
    SMTPS_EXT_BINARYMIME = 1024,
    SMTPS_EXT_REQUIRETLS = 2048
};

enum smtps_auth_mech {
    SMTPS_AUTH_CRAM_MD5 = 4,
    SMTPS_AUTH_PLAIN = 1,
    SMTPS_AUTH_LOGIN = 2,
    SMTPS_AUTH_XOAUTH2 = 8
};

enum smtps_xclient_attr {
    SMTPS_XCLIENT_NAME = 1,
    SMTPS_XCLIENT_ADDR = 2,
    SMTPS_XCLIENT_PORT = 4,
    SMTPS_XCLIENT_PROTO = 8,
    SMTPS_XCLIENT_HELO = 16,
    SMTPS_XCLIENT_LOGIN = 32,
    SMTPS_XCLIENT_DESTADDR = 64,
    SMTPS_XCLIENT_DESTPORT = 128
};

const char *smtps_extension_name(unsigned bit);
const char *smtps_auth_mech_name(unsigned bit);
const char *smtps_xclient_attr_name(unsigned bit);

struct smtps_caps {
    unsigned ext;
    uint64_t size_max;
    unsigned auth;
    unsigned xclient;
};

int smtps_caps_parse(const struct smtps_reply *ehlo, struct smtps_caps *caps);
