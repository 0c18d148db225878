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
