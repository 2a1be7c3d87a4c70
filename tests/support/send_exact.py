#!/usr/bin/env python3
"""Sends Part 10 files by C-STORE with their data set bytes exactly as stored in the file.

usage: send_exact.py HOST PORT CALLED_AE FILE...

pynetdicom with STORE_SEND_CHUNKED_DATASET streams the file's data set unchanged, in the file's own
transfer syntax (DCMTK's storescu may convert). Prints one line per file:
"<status hex> <path>" (status "----" when the file could not be sent at all) and exits 0.
"""
import logging
import os
import sys

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
import pynetdicom_race  # noqa: F401  (mends a pynetdicom race that drops responses)

_config.STORE_SEND_CHUNKED_DATASET = True


def main():
    # pynetdicom's own warnings (an unexpected message, an abort) go to stderr.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    host, port, called = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    files = []
    for path in sys.argv[4:]:
        try:
            meta = read_file_meta_info(path)
            files.append((path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception as e:  # unreadable file meta: report and go on
            print(f"---- {path} {e}", flush=True)
    # One association per batch of at most 128 distinct presentation contexts (PS3.8 §9.3.2.2).
    while files:
        contexts, batch, rest = [], [], []
        for f in files:
            key = (f[1], f[2])
            if key in contexts or len(contexts) < 128:
                if key not in contexts:
                    contexts.append(key)
                batch.append(f)
            else:
                rest.append(f)
        files = rest
        ae = AE(ae_title="SENDEXACT")
        ae.acse_timeout = 30
        # pynetdicom notices a peer that died mid-message only by this timeout; tests that kill
        # the receiver set it low.
        ae.dimse_timeout = float(os.environ.get("SEND_EXACT_DIMSE_TIMEOUT", "120"))
        ae.network_timeout = ae.dimse_timeout
        for sop, ts in contexts:
            ae.add_requested_context(sop, [ts])
        assoc = ae.associate(host, port, ae_title=called)
        if not assoc.is_established:
            for path, _, _ in batch:
                print(f"---- {path} association failed", flush=True)
            continue
        for path, _, _ in batch:
            try:
                status = assoc.send_c_store(path)
                code = getattr(status, "Status", None)
                print(f"{code:04X} {path}" if code is not None else f"---- {path} no response", flush=True)
            except Exception as e:
                print(f"---- {path} {e}", flush=True)
        assoc.release()


if __name__ == "__main__":
    main()
