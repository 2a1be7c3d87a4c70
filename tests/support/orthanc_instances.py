#!/usr/bin/env python3
"""Lists what an Orthanc server holds, through its REST API.

usage: orthanc_instances.py HTTP_PORT

Prints a JSON object: SOP Instance UID -> SHA-256 (hex) of the data set bytes Orthanc stored
(its Part 10 file minus the File Meta Information), so a test can compare them with what a
sender sent.
"""
import hashlib
import json
import sys
import urllib.request

from orthanc_peer import dataset_bytes


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as r:
        return r.read()


def main():
    port = int(sys.argv[1])
    out = {}
    for i in json.loads(get(port, "/instances")):
        ds, meta = dataset_bytes(get(port, f"/instances/{i}/file"))
        out[str(meta.MediaStorageSOPInstanceUID)] = hashlib.sha256(ds).hexdigest()
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
