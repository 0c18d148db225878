/*
 * cffi cdef: the trampolines through which C calls Python states. Each is
 * defined once, globally, by @ffi.def_extern in the Python package; a
 * Python state registers them as its smtp_state callbacks, with an
 * ffi.new_handle() of itself as closure. Their signatures are those of
 * the SMTPState* typedefs in machine.h.
 */

extern "Python" int smtps_py_init_local(struct smtps_session *, void *,
                                        void **);
extern "Python" int smtps_py_setup(struct smtps_session *, void *);
extern "Python" int smtps_py_callback(struct smtps_session *,
                                      const struct smtps_reply *, void *);
extern "Python" void smtps_py_free(struct smtps_session *, void *, void *);
extern "Python" int smtps_py_tostage(struct smtps_session *, int, void *);
extern "Python" const char *smtps_py_tostring(int, void *);

/* A message body read as it is sent (an SMTPSBodyRead). */
extern "Python" long smtps_py_body_read(void *, uint64_t, char *, size_t, char *,
                                        size_t);

/* The transcript of the drivers' sessions (an SMTPSTrace). */
extern "Python" void smtps_py_trace(struct smtps_session *, int, const char *,
                                    size_t, void *);
