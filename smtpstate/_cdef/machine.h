/*
 * cffi cdef for include/smtpstate.h: the state table (Momentum's
 * contract) and machines. struct smtp_state lists every field, with no
 * "...", so that Python can build one field by field and the compiler
 * refuses any drift from the real header.
 */

struct smtps_session;
typedef struct smtp_state smtp_state;

typedef int (*SMTPStateInitLocal)(struct smtps_session *session,
                                  void *closure, void **local);
typedef int (*SMTPStateSetup)(struct smtps_session *session, void *closure);
typedef int (*SMTPStateCallback)(struct smtps_session *session,
                                 const struct smtps_reply *reply,
                                 void *closure);
typedef void (*SMTPStateFree)(struct smtps_session *session, void *local,
                              void *closure);
typedef int (*SMTPStateToStage)(struct smtps_session *session, int awaiting,
                                void *closure);
typedef const char *(*SMTPStageToString)(int stage, void *closure);

#define SMTPS_STATE_PIPELINABLE ...

struct smtp_state {
    size_t sizeof_smtp_state;
    const char *name;
    int id;
    SMTPStateInitLocal init_local_state;
    SMTPStateSetup setup;
    SMTPStateCallback callback;
    SMTPStateFree free;
    SMTPStateToStage tostage;
    SMTPStageToString tostring;
    smtp_state *next;
    void *closure;
    unsigned flags;
};

#define SMTPS_STATE_MIN_SIZE ...

int register_smtp_client_state(smtp_state *state, int insert_after);
smtp_state *smtp_get_state(int id);
smtp_state *smtp_get_state_machine(void);
void smtp_next_state(struct smtps_session *session, smtp_state *state);

struct smtps_machine;

struct smtps_machine *smtps_default_machine(void);
struct smtps_machine *smtps_machine_new(void);
void smtps_machine_free(struct smtps_machine *m);
int smtps_machine_register(struct smtps_machine *m, smtp_state *state,
                           int insert_after);
smtp_state *smtps_machine_get(struct smtps_machine *m, int id);
smtp_state *smtps_machine_head(struct smtps_machine *m);
int smtps_machine_find(struct smtps_machine *m, const char *name);
int smtps_machine_count(struct smtps_machine *m);
