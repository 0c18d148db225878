"""The queue's wire formats without a broker: both encodings (JSON and
msgpack) of jobs, batches with a common part, and results; the fast way
of reading the usual job agrees with the full checks on tricky and
generated inputs; the usual outcome made directly is the record the
general way makes."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

import helpers

import smtpstate
from smtpstate import _encoding, _jobs, _outcome
from smtpstate import queue as sq
from smtpstate.errors import InvalidOptionError
from smtpstate.result import RecipientResult, Reply, Result

msgpack = helpers.import_or_missing("msgpack")

UUID = "0b8f7f9a-3c1e-4c6e-9d0a-5f2b8e1c7a64"


def _job(**fields):
    msg = smtpstate.Message("a@example.org", ["b@example.net"],
                            b"Subject: x\r\n\r\nbody\r\n.dot\r\n")
    job = sq.Job.from_message(msg, "127.0.0.1", 2525, tls="none")
    job.id = UUID
    job.first_enqueued = 1_700_000_000.5
    for name, value in fields.items():
        setattr(job, name, value)
    return job


def _checked(obj, binary):
    """What the full checks say: a Job, or the JobError's text."""
    try:
        return sq.Job._from_object_checked(copy.deepcopy(obj), binary)
    except sq.JobError as e:
        return str(e)


# Each mutates a usual job's object; the fast way must either say "not
# sure" or make the same job as the full checks (which may refuse it).
MUTATIONS = [
    ("nothing", lambda o: None),
    ("uppercase id", lambda o: o.update(id=UUID.upper())),
    ("id in braces", lambda o: o.update(id="{" + UUID + "}")),
    ("id without hyphens", lambda o: o.update(id=UUID.replace("-", ""))),
    ("id not a uuid", lambda o: o.update(id="x" * 36)),
    ("id an int", lambda o: o.update(id=7)),
    ("version true", lambda o: o.update(version=True)),
    ("version 2", lambda o: o.update(version=2)),
    ("version 1.0", lambda o: o.update(version=1.0)),
    ("port 0", lambda o: o.update(port=0)),
    ("port true", lambda o: o.update(port=True)),
    ("port 65536", lambda o: o.update(port=65536)),
    ("attempts -1", lambda o: o.update(attempts=-1)),
    ("attempts false", lambda o: o.update(attempts=False)),
    ("first_enqueued nan", lambda o: o.update(first_enqueued=math.nan)),
    ("first_enqueued inf", lambda o: o.update(first_enqueued=math.inf)),
    ("first_enqueued huge", lambda o: o.update(first_enqueued=10 ** 30)),
    ("first_enqueued int", lambda o: o.update(first_enqueued=1_700_000_000)),
    ("first_enqueued true", lambda o: o.update(first_enqueued=True)),
    ("settled entry", lambda o: o.update(settled=[{"address": "c@example.net",
                                                   "status": "permfail", "index": 1}])),
    ("message option", lambda o: o.update(message_options={"envid": "e"})),
    ("message option unknown", lambda o: o.update(message_options={"x": 1})),
    ("option unknown", lambda o: o["options"].update(auth="x")),
    ("option tls bogus", lambda o: o["options"].update(tls="maybe")),
    ("option tls none value", lambda o: o["options"].update(tls=None)),
    ("option timeout bool", lambda o: o["options"].update(timeout=True)),
    ("option timeout float", lambda o: o["options"].update(timeout=2.5)),
    ("no options", lambda o: o.update(options={})),
    ("host none", lambda o: o.update(host=None)),
    ("host int", lambda o: o.update(host=1)),
    ("sender empty", lambda o: o.update(sender="")),
    ("sender with brackets", lambda o: o.update(sender="<a@example.org>")),
    ("sender with CRLF", lambda o: o.update(sender="a@x\r\nRCPT TO:<y>")),
    ("sender non-ascii", lambda o: o.update(sender="ä@example.org")),
    ("sender surrogate", lambda o: o.update(sender="\udcff@x")),
    ("no recipients", lambda o: o.update(recipients=[])),
    ("recipient notify", lambda o: o["recipients"][0].update(notify=["NEVER"])),
    ("recipient orcpt", lambda o: o["recipients"][0].update(orcpt="b@example.net")),
    ("recipient index bool", lambda o: o["recipients"][0].update(index=True)),
    ("recipient extra key", lambda o: o["recipients"][0].update(extra=1)),
    ("recipient address int", lambda o: o["recipients"][0].update(address=5)),
    ("recipient space", lambda o: o["recipients"][0].update(address="b @example.net")),
    ("recipient as a string", lambda o: o.update(recipients=["b@example.net"])),
    ("two recipients", lambda o: o["recipients"].append(
        {"address": "c@example.net", "notify": [], "orcpt": None, "index": 1})),
    ("redelivered", lambda o: o.update(redelivered=True)),
    ("redelivered string", lambda o: o.update(redelivered="yes")),
    ("extra field", lambda o: o.update(extra=1)),
    ("missing field", lambda o: o.pop("settled")),
]
DATA_MUTATIONS = [
    ("data with NUL", b"a\x00b\r\n"),
    ("data long line", b"x" * 2000 + b"\r\n"),
    ("data empty", b""),
    ("data bare LF", b"a\nb\n"),
]
JSON_DATA = [
    ("base64 without padding", "YWJj"[:3]),
    ("base64 bad padding", "YQ="),
    ("base64 non-canonical bits", "YR=="),
    ("base64 with newline", "YWJj\nZGVm"),
    ("base64 with space", "YWJj ZGVm"),
    ("base64 url alphabet", "-_-_"),
    ("base64 non-ascii", "YWJjé"),
    ("data bytes in json", b"abc"),
]


def _agree(obj, binary):
    fast = _jobs._usual_job(sq.Job, copy.deepcopy(obj), binary)
    checked = _checked(obj, binary)
    if fast is not None:
        assert isinstance(checked, sq.Job), checked
        assert fast == checked
        assert fast.message() == checked.message()
    return fast, checked


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_the_fast_way_agrees_with_the_full_checks(binary):
    accepted = 0
    for _name, mutate in MUTATIONS:
        obj = _job().to_object(binary)
        mutate(obj)
        fast, _ = _agree(obj, binary)
        accepted += fast is not None
    for _name, data in DATA_MUTATIONS:
        obj = _job(data=data).to_object(binary)
        _agree(obj, binary)
    if not binary:
        for _name, text in JSON_DATA:
            obj = _job().to_object(False)
            obj["data"] = text
            _agree(obj, False)
    else:
        obj = _job().to_object(True)
        obj["data"] = "text"                    # a str where msgpack has bytes
        assert _jobs._usual_job(sq.Job, obj, True) is None
        assert "data must be a bytes" in _checked(obj, True)
    # The usual job and its harmless variants do take the fast way.
    assert accepted >= 6


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_the_fast_way_agrees_on_generated_jobs(binary):
    rng = random.Random(20261208)
    pieces = ["a", "@", "example.org", ".", "-", " ", "<", ">", "\r\n", "é", "\x00", "+x"]
    for _ in range(400):
        obj = _job().to_object(binary)
        obj["sender"] = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
        obj["recipients"][0]["address"] = "".join(rng.choice(pieces)
                                                  for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.3:
            obj["port"] = rng.choice([0, 1, 25, 65535, 65536, -1, True, "25"])
        if rng.random() < 0.3:
            obj["options"] = rng.choice([{}, {"tls": "none"}, {"tls": "dane"}, {"timeout": 5},
                                         {"timeout": "5"}, {"tls": None}, {"helo": 3}])
        _agree(obj, binary)


def test_a_batch_with_a_common_part_gives_the_jobs_it_was_made_of():
    jobs = [_job(id=f"{i:08x}-3c1e-4c6e-9d0a-5f2b8e1c7a64") for i in range(5)]
    jobs[3].recipients = [{"address": "c@example.net", "notify": ["DELAY"], "orcpt": None,
                           "index": 2}]
    jobs[3]._message = None
    for binary in (False, True):
        body = sq._jobs_body(jobs, binary)
        obj, was_binary = _encoding.decode(body)
        assert was_binary is binary
        # What all share is written once; each job keeps its own.
        assert set(obj["common"]) == {"version", "sender", "message_options", "host", "port",
                                      "options", "attempts", "first_enqueued", "settled"}
        assert all(set(item) == {"id", "recipients", "data"} for item in obj["jobs"])
        back, batch = sq.parse_jobs(body)
        assert batch and back == jobs
        assert back[3].message().recipient_options[0].notify == ("DELAY",)
    # Jobs that share less: the rest stays in each one.
    jobs[1].attempts, jobs[2].sender = 3, "other@example.org"
    obj = json.loads(sq._jobs_body(jobs, False))
    assert "attempts" not in obj["common"] and "sender" not in obj["common"]
    assert sq.parse_jobs(sq._jobs_body(jobs, False))[0] == jobs


@pytest.mark.parametrize("change, words", [
    (lambda o: o["jobs"][1].update(port=25), "job 1 of the batch: field(s) port both"),
    (lambda o: o["common"].update(id=UUID), "common part must be an object of job fields"),
    (lambda o: o.update(common=[]), "common part must be an object"),
    (lambda o: o["jobs"][0].pop("data"), "job 0 of the batch: job field(s) missing: data"),
    (lambda o: o["common"].update(port="25"), "job 0 of the batch: job field port must"),
    (lambda o: o.update(extra=1), "a batch must be"),
    (lambda o: o.update(jobs=[]), "list of 1 to 1000 jobs"),
])
def test_a_bad_batch_is_refused_whole_saying_where(change, words):
    jobs = [_job(id=f"{i:08x}-3c1e-4c6e-9d0a-5f2b8e1c7a64") for i in range(3)]
    obj = json.loads(sq._jobs_body(jobs, False))
    change(obj)
    with pytest.raises(sq.JobError) as e:
        sq.parse_jobs(json.dumps(obj).encode())
    assert words in str(e.value)


def test_the_encodings_are_told_apart_by_their_first_byte():
    obj = {"version": 1, "x": [1, "two", None, 2.5]}
    for binary in (False, True):
        body = _encoding.encode(obj, binary)
        assert _encoding.is_msgpack(body) is binary
        assert _encoding.decode(body) == (obj, binary)
    assert _encoding.decode(b"  \n" + json.dumps(obj).encode()) == (obj, False)
    big = {f"k{i}": i for i in range(20)}                  # a map16: 0xde
    assert _encoding.decode(msgpack.packb(big)) == (big, True)
    for bad, words in [(b"\x81\xa1", "not valid msgpack"), (b"\x80extra", "not valid msgpack"),
                       (b"\xff", "neither msgpack nor UTF-8"), (b"{", "not valid JSON")]:
        with pytest.raises(ValueError, match=words):
            _encoding.decode(bad)
    # An ext type or a msgpack timestamp is no job field a job can have.
    obj = _job().to_object(True)
    obj["first_enqueued"] = msgpack.ExtType(1, b"x")
    with pytest.raises(sq.JobError, match="first_enqueued"):
        sq.parse_jobs(msgpack.packb(obj, use_bin_type=True))
    with pytest.raises(InvalidOptionError, match="encoding must be one of json, msgpack"):
        sq.enqueue([], "amqp://127.0.0.1:1//", encoding="pickle")


def _result(status, rcpt_status, code=250, rcpt_reply=True, reason=""):
    reply = Reply(code, "2.0.0", "Ok: queued as 4AbC") if code else None
    rr = RecipientResult("b@example.net", rcpt_status,
                         Reply(250, "2.1.5", "Ok") if rcpt_reply else None, mx="127.0.0.1")
    return Result(status=status, reply=reply, recipients=(rr,), stage="", stage_code=0,
                  state=None, reason=reason)


@pytest.mark.parametrize("redelivered", [False, True])
@pytest.mark.parametrize("rcpt_reply", [False, True])
def test_the_usual_outcome_made_directly_is_the_general_record(redelivered, rcpt_reply):
    for job in (_job(), _job(redelivered=True), _job(attempts=4)):
        result = _result("delivered", "delivered", rcpt_reply=rcpt_reply)
        fast = _outcome._decide(job, result, sq.DEFAULT_SCHEDULE, sq.DEFAULT_MAX_AGE,
                          redelivered, now=1_700_000_100.0)
        general = _outcome._decide_general(job, result, sq.DEFAULT_SCHEDULE, sq.DEFAULT_MAX_AGE,
                                     redelivered, now=1_700_000_100.0)
        assert fast == general
        assert fast[2]["status"] == "delivered" and fast[0] is None
    assert sq.outcome(_job(), _result("delivered", "delivered"), now=1.0e9).final \
        == _outcome._decide_general(_job(), _result("delivered", "delivered"), sq.DEFAULT_SCHEDULE,
                              sq.DEFAULT_MAX_AGE, False, now=1.0e9)[2]


def test_a_results_batch_is_read_as_its_results():
    finals = [{"job": str(i), "status": "delivered"} for i in range(3)]
    for binary in (False, True):
        assert sq._results_of(_jobs._results_body(finals, binary)) == finals
        assert sq._results_of(_encoding.encode(finals[0], binary)) == [finals[0]]
