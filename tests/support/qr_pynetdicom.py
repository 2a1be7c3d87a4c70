#!/usr/bin/env python3
"""C-GET and a cancelled C-MOVE with pynetdicom, against a dicomchain node.

usage: qr_pynetdicom.py PORT STUDY_UID MOVE_DESTINATION FILE...

1. C-GET (Study Root, STUDY level) of STUDY_UID, receiving on the same association (SCP role
   for CT Image Storage); every data set received is compared byte for byte (pynetdicom hands
   the handler the encoded data set as it came off the wire) with the files given.
2. C-MOVE of the same study to MOVE_DESTINATION, with a C-CANCEL sent as soon as the first
   pending response arrives: the final status must be FE00 (Cancel) with fewer completed
   sub-operations than instances.
Prints a JSON report; exits 0 when both held.
"""
import json
import sys

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE, StoragePresentationContexts, _config, evt, build_role
from pynetdicom.sop_class import (CTImageStorage, StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)
import pynetdicom_race  # noqa: F401  (mends a pynetdicom race that drops responses)

_config.LOG_HANDLER_LEVEL = "none"


def dataset_bytes(path):
    raw = open(path, "rb").read()
    import io
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return str(meta.MediaStorageSOPInstanceUID), raw[fp.tell():]


def main():
    port, study, dest, files = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    sent = dict(dataset_bytes(p) for p in files)
    report = {"ok": False, "get_status": None, "get_received": 0, "get_identical": 0,
              "move_status": None, "move_completed": None, "errors": []}
    received = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0x0000

    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMCHAIN",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        report["errors"].append("association not established")
    else:
        for status, _ in assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet):
            if status is not None:
                report["get_status"] = int(status.Status)
        report["get_received"] = len(received)
        report["get_identical"] = sum(1 for u, b in received.items() if sent.get(u) == b)
        # C-MOVE with an early C-CANCEL.
        responses = assoc.send_c_move(ident, dest, StudyRootQueryRetrieveInformationModelMove,
                                      msg_id=7)
        cancelled = False
        for status, _ in responses:
            if status is None:
                continue
            s = int(status.Status)
            if s in (0xFF00, 0xFF01) and not cancelled:
                ctx = next(c for c in assoc.accepted_contexts
                           if c.abstract_syntax == StudyRootQueryRetrieveInformationModelMove)
                assoc.send_c_cancel(7, ctx.context_id)
                cancelled = True
            if s not in (0xFF00, 0xFF01):
                report["move_status"] = s
                report["move_completed"] = int(status.get("NumberOfCompletedSuboperations", 0))
        assoc.release()
    report["ok"] = (report["get_status"] == 0 and report["get_received"] == len(sent)
                    and report["get_identical"] == len(sent) and report["move_status"] == 0xFE00
                    and report["move_completed"] is not None and report["move_completed"] < len(sent))
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
