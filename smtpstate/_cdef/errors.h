/*
 * cffi cdef for include/smtpstate.h: error codes. This file is parsed by
 * cffi's cdef() only, never by a C compiler; smtpstate/_build.py reads
 * the files of this directory in a fixed order. API mode compiles these
 * declarations against the real header, so any drift is a build error.
 */

enum smtps_error {
    SMTPS_OK = 0,
    SMTPS_ENOMEM = -1,
    SMTPS_EINVAL = -2,
    SMTPS_ETOOBIG = -3,
    SMTPS_EPROTO = -4,
    SMTPS_ESTATE = -5,
    SMTPS_EFULL = -6,
    SMTPS_ECLOSED = -7,
    SMTPS_ENOTFOUND = -8,
    SMTPS_ETLS = -9,
    SMTPS_ENOTSUP = -10,
    SMTPS_ESYS = -11,
    SMTPS_EINTR = -12,
    SMTPS_EAGAIN = -13
};

const char *smtps_strerror(int code);
