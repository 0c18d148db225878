/*
 * cffi cdef for include/smtpstate.h: TLS (RFC 3207) and AUTH (RFC 4954)
 * options of a session.
 */

#define SMTPS_TLS_NONE ...
#define SMTPS_TLS_OPPORTUNISTIC ...
#define SMTPS_TLS_STARTTLS ...
#define SMTPS_TLS_VERIFY ...
#define SMTPS_TLS_IMPLICIT ...
#define SMTPS_TLS_DANE ...
#define SMTPS_TLS_DANE_ONLY ...
#define SMTPS_TLS_MTA_STS ...
#define SMTPS_AUTH_ANY ...

#define SMTPS_TLS_V1_2 ...
#define SMTPS_TLS_V1_3 ...

struct smtps_tls_settings {
    size_t sizeof_settings;
    const char *ca_file;
    const char *ca_path;
    int insecure_no_verify;
    const char *cert_file;
    const char *key_file;
    const char *key_password;
    int min_version;
    const char *ciphers;
    const char *ciphersuites;
};

struct smtps_tls_config;

int smtps_tls_config_make(const struct smtps_tls_settings *ts,
                          struct smtps_tls_config **cfg, char *why,
                          size_t why_len);
struct smtps_tls_config *smtps_tls_config_new(const char *ca_file,
                                              int insecure_no_verify);
void smtps_tls_config_free(struct smtps_tls_config *c);
int smtps_session_set_tls(struct smtps_session *s, int mode,
                          struct smtps_tls_config *cfg, const char *servername);
int smtps_session_tls_active(const struct smtps_session *s);
const char *smtps_session_tls_version(const struct smtps_session *s);
int smtps_session_tls_resumed(const struct smtps_session *s);
int smtps_session_set_auth(struct smtps_session *s, const char *user,
                           const char *secret, unsigned mechs,
                           int allow_plaintext);
