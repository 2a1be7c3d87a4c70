#!/usr/bin/env python3
"""A Storage SCP that answers every C-STORE with a failure status (a PACS refusing instances).

usage: refusing_scp.py PORT STATUS_HEX LOG

Accepts every storage SOP class in every transfer syntax, answers each C-STORE-RQ with
STATUS_HEX (e.g. A700) and appends the SOP Instance UID of each request to LOG, so a test can
count the attempts it made. PORT 0 picks a free port. Prints the port it listens on once it
does (so a caller never mistakes another server on that port for this one).
"""
import sys
import threading

from pynetdicom import AE, evt, AllStoragePresentationContexts
from pynetdicom.presentation import build_context
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                         JPEGBaseline8Bit, JPEGLosslessSV1, JPEG2000Lossless, RLELossless)

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, JPEGBaseline8Bit,
            JPEGLosslessSV1, JPEG2000Lossless, RLELossless]


def main():
    port, status, log = int(sys.argv[1]), int(sys.argv[2], 16), sys.argv[3]

    def on_store(event):
        with open(log, "a") as f:
            f.write(f"{event.request.AffectedSOPInstanceUID}\n")
        return status

    ae = AE(ae_title="REFUSER")
    ae.supported_contexts = [build_context(cx.abstract_syntax, SYNTAXES)
                             for cx in AllStoragePresentationContexts]
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    print(server.server_address[1], flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
