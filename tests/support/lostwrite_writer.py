#!/usr/bin/env python3
"""The application of the lost-write checker (tests/lab_lostwrite.rs).

Usage: lostwrite_writer.py MODULE DATA_DIR

Appends numbered, checksummed, fixed-size records to DATA_DIR/records (through the primary's
replication mount) and fsyncs each one. Only after fsync has returned for record N does it
append "N HOST INCARNATION NS" to the ack log, $HAMIRROR_STATE_DIR/lostwrite-MODULE.acks:
the host's private state directory, on the machine's disk, outside the replicated data, so
the log survives the host's power loss. NS is CLOCK_REALTIME right after fsync returned.

A record is REC (256) bytes of ASCII:
    "LW1 <seq, 12 digits> <host, 16 wide> <incarnation, 26 wide> <filler>"  (BODY bytes)
    + sha256(body) in hex (64) + "\\n"
The incarnation (start time and random bits) differs at every start, so a record that was
lost and written again by a later run cannot pass for the acknowledged one.

On start it resumes after the last intact record of the leading run (record i at offset
(i-1)*REC, carrying sequence number i, checksum right). Anything after it is truncated away;
when that is more than a torn last record, the discarded bytes are kept in
$HAMIRROR_STATE_DIR/lostwrite-MODULE.discarded-INCARNATION for the investigation. Every start
and discard is logged in $HAMIRROR_STATE_DIR/lostwrite-MODULE.log.

It writes at most RATE records per second, back to back while it is behind.

While $HAMIRROR_STATE_DIR/lostwrite-MODULE.pause exists, it writes nothing: it says so in
lostwrite-MODULE.paused ("HOST INCARNATION LAST_SEQ"), removed when it goes on.

It refuses to start unless DATA_DIR is a FUSE mount (the replication's mountover): writing
the real directory beneath would bypass the replication.
"""

import hashlib
import os
import socket
import sys
import time

REC = 256
BODY = REC - 64 - 1
# Records per second at most (unbounded, a 200-seed run would grow the file past 500 MiB).
RATE = 500


def record(seq, host, inc):
    head = "LW1 %012d %-16s %-26s " % (seq, host, inc)
    filler = hashlib.sha256(("%d %s" % (seq, inc)).encode()).hexdigest() * 4
    body = (head + filler)[:BODY].encode()
    assert len(body) == BODY
    return body + hashlib.sha256(body).hexdigest().encode() + b"\n"


def seq_of(rec):
    """The sequence number of an intact record, else None."""
    body, digest = rec[:BODY], rec[BODY : REC - 1]
    if len(rec) != REC or rec[-1:] != b"\n" or hashlib.sha256(body).hexdigest().encode() != digest:
        return None
    fields = body.split()
    if len(fields) < 4 or fields[0] != b"LW1" or not fields[1].isdigit():
        return None
    return int(fields[1])


def fuse_mounted(path):
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == path and fields[2].startswith("fuse"):
                return True
    return False


def read_all(fd):
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def main():
    module, data_dir = sys.argv[1], sys.argv[2].rstrip("/")
    state = os.environ.get("HAMIRROR_STATE_DIR", "/var/lib/hamirror")
    host = socket.gethostname()
    inc = "%x-%s" % (time.time_ns(), os.urandom(4).hex())
    base = os.path.join(state, "lostwrite-" + module)
    log = open(base + ".log", "a", buffering=1)

    def say(text):
        log.write("%d %s %s %s\n" % (time.time_ns(), host, inc, text))

    if not fuse_mounted(data_dir):
        say("refusing to start: %s is not the replication's FUSE mount" % data_dir)
        sys.exit(1)
    fd = os.open(os.path.join(data_dir, "records"), os.O_RDWR | os.O_CREAT, 0o644)
    data = read_all(fd)
    n = 0
    while (n + 1) * REC <= len(data) and seq_of(data[n * REC : (n + 1) * REC]) == n + 1:
        n += 1
    extra = data[n * REC :]
    if extra:
        say("resuming after record %d: discarding the %d bytes after it" % (n, len(extra)))
        if len(extra) >= REC:
            with open("%s.discarded-%s" % (base, inc), "wb") as kept:
                kept.write(extra)
            say("more than a torn record: the discarded bytes are in %s.discarded-%s" % (base, inc))
        os.ftruncate(fd, n * REC)
        os.fsync(fd)
    else:
        say("resuming after record %d" % n)
    acks = os.open(base + ".acks", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pause, paused = base + ".pause", base + ".paused"
    if os.path.exists(paused):
        os.unlink(paused)
    seq = n + 1
    due = time.monotonic()
    while True:
        if os.path.exists(pause):
            with open(paused + ".tmp", "w") as f:
                f.write("%s %s %d\n" % (host, inc, seq - 1))
            os.rename(paused + ".tmp", paused)
            while os.path.exists(pause):
                time.sleep(0.02)
            os.unlink(paused)
            due = time.monotonic()
        os.pwrite(fd, record(seq, host, inc), (seq - 1) * REC)
        os.fsync(fd)
        now = time.time_ns()
        os.write(acks, ("%d %s %s %d\n" % (seq, host, inc, now)).encode())
        seq += 1
        due = max(due + 1 / RATE, time.monotonic() - 0.1)
        ahead = due - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


if __name__ == "__main__":
    main()
