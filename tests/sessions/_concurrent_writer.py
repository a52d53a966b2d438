"""Child process for test_session_durability: appends COUNT messages tagged NAME to one session,
re-reading and retrying on VersionConflict, then prints "done RETRIES"."""

import sys

from kvstrata.sessions import VersionConflict, open_store


def main(url, sid, name, count):
    store = open_store(url)
    retries = 0
    for i in range(int(count)):
        while True:
            v = store.get_session_info(sid, owner=None).version
            try:
                store.append(sid, owner=None, expected_version=v,
                             messages=[{"role": "user", "content": f"{name}:{i}"}], token_ids=[i])  # fmt: skip
                break
            except VersionConflict:
                retries += 1
    print("done", retries, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
