"""Child process for test_session_durability: writes sessions until it is killed.

    _crash_writer.py URL loop   create sessions and append to them forever; after each committed
                                write print "created SID" or "appended SID N" (flushed)
    _crash_writer.py URL hang   create one session, print "created SID", then start an append and
                                stop inside its transaction (after the messages are inserted, before
                                the session row's update and the commit): print "inside SID" and sleep until killed

Append number n (1-based) adds messages u{n} and a{n} (with a bulky payload), token ids 3n..3n+2 and
one block key sha256(n), so the reader can check any state for exactly-whole appends.
"""

import hashlib
import sys
import time

from kvstrata.sessions import open_store

PAYLOAD = "x" * 20000


def append_args(n):
    return dict(
        messages=[{"role": "user", "content": f"u{n}", "pad": PAYLOAD},
                  {"role": "assistant", "content": f"a{n}", "pad": PAYLOAD}],
        token_ids=[3 * n, 3 * n + 1, 3 * n + 2],
        block_keys=[hashlib.sha256(str(n).encode()).digest()],
    )  # fmt: skip


def main(url, mode):
    store = open_store(url)
    if mode == "hang":
        s = store.create_session(owner=None, messages=[{"role": "system", "content": "start"}])
        print("created", s.id, flush=True)
        def stall(*a, **kw):  # every row of the append is written; its final UPDATE and COMMIT are not
            print("inside", s.id, flush=True)
            time.sleep(3600)

        store._bump = stall
        store.append(s.id, owner=None, expected_version=1, **append_args(1))
        return
    while True:
        s = store.create_session(owner=None, messages=[{"role": "system", "content": "start"}])
        print("created", s.id, flush=True)
        for n in range(1, 9):
            store.append(s.id, owner=None, expected_version=n, **append_args(n))
            print("appended", s.id, n, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
