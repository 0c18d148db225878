/*
 * cffi cdef for include/smtpstate.h: the body encoder (CRLF
 * normalisation, dot-stuffing, BDAT sizes).
 */

struct smtps_body_encoder {
    int dot_stuff;
    int at_line_start;
    int after_cr;
    uint64_t out_total;
};

#define SMTPS_BODY_STEP_MAX ...
#define SMTPS_BODY_FINISH_MAX ...

void smtps_body_init(struct smtps_body_encoder *e, int dot_stuff);
size_t smtps_body_encode(struct smtps_body_encoder *e, const char *in,
                         size_t inlen, size_t *in_used, char *out,
                         size_t outcap);
size_t smtps_body_finish(struct smtps_body_encoder *e, char *out,
                         size_t outcap, int end_dot);
uint64_t smtps_body_encoded_length(const char *in, size_t len);
int smtps_body_is_8bit(const char *in, size_t len);

#define SMTPS_LINE_OCTETS_MAX ...
#define SMTPS_BODY_NUL ...
#define SMTPS_BODY_LONG_LINE ...
#define SMTPS_BODY_ALLOW_LONG_LINES ...

struct smtps_body_scan {
    unsigned flags;
    uint64_t offset;
    uint64_t size;
    uint64_t line;
    uint64_t line_len;
    uint64_t longest;
    int after_cr;
    int is_8bit;
    int problem;
    uint64_t problem_line;
    uint64_t problem_offset;
};

void smtps_body_scan_init(struct smtps_body_scan *sc, unsigned flags);
int smtps_body_scan(struct smtps_body_scan *sc, const char *in, size_t len);
int smtps_body_scan_finish(struct smtps_body_scan *sc);
int smtps_body_check(const char *in, size_t len, unsigned flags);
