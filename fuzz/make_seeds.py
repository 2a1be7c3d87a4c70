#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets under fuzz/seeds/<target>/ (committed; rerun after
changing it). PDUs and command sets are built byte by byte after PS3.8 and PS3.7; data sets are
real files from pydicom's test corpus, with a selector byte in front (see the targets)."""
import os
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "seeds"


def write(target, name, data):
    d = HERE / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def item(kind, body):
    return struct.pack(">BBH", kind, 0, len(body)) + body


def pdu(kind, body):
    return struct.pack(">BBI", kind, 0, len(body)) + body


def ae(s):
    return s.encode().ljust(16)


def assoc_rq(contexts, max_pdu=16384, ext=b""):
    body = struct.pack(">HH", 1, 0) + ae("DICOMCHAIN") + ae("FUZZ") + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    for i, (sop, tss) in enumerate(contexts):
        sub = item(0x30, sop.encode()) + b"".join(item(0x40, t.encode()) for t in tss)
        body += item(0x20, struct.pack(">BBBB", 2 * i + 1, 0, 0, 0) + sub)
    user = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.2.1143")
    user += item(0x55, b"FUZZ_1") + ext
    body += item(0x50, user)
    return pdu(0x01, body)


def el(tag, value):
    """Implicit VR Little Endian element, value padded to even length."""
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def u16(v):
    return struct.pack("<H", v)


def command(elements):
    body = b"".join(el(t, v) for t, v in sorted(elements))
    return el(0x00000000, struct.pack("<I", len(body))) + body


CT = b"1.2.840.10008.5.1.4.1.1.2"
FIND = b"1.2.840.10008.5.1.4.1.2.2.1"
MOVE = b"1.2.840.10008.5.1.4.1.2.2.2"
IVLE, EVLE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"


def main():
    # PDUs: association requests (with role selection and extended negotiation), data, release,
    # abort, and a P-DATA carrying a command.
    write("pdu", "associate_rq", assoc_rq([(CT.decode(), [EVLE, IVLE]), (FIND.decode(), [IVLE])]))
    role = item(0x54, struct.pack(">H", len(CT)) + CT + b"\x01\x01")
    ext = item(0x56, struct.pack(">H", len(FIND)) + FIND + b"\x01\x01")
    write("pdu", "associate_rq_roles", assoc_rq([(CT.decode(), [EVLE])], 0, role + ext))
    store = command([(0x00000002, CT), (0x00000100, u16(1)), (0x00000110, u16(7)),
                     (0x00000700, u16(0)), (0x00000800, u16(0)), (0x00001000, b"1.2.3.4")])
    pdv = struct.pack(">IB", len(store) + 2, 1) + b"\x03" + store
    write("pdu", "p_data_command", pdu(0x04, pdv))
    write("pdu", "release_rq", pdu(0x05, bytes(4)))
    write("pdu", "abort", pdu(0x07, bytes([0, 0, 2, 0])))

    # Command sets.
    write("command", "c_store_rq", store)
    write("command", "c_echo_rq", command([(0x00000002, b"1.2.840.10008.1.1"), (0x00000100, u16(0x30)),
                                           (0x00000110, u16(1)), (0x00000800, u16(0x0101))]))
    write("command", "c_move_rq", command([(0x00000002, MOVE), (0x00000100, u16(0x21)), (0x00000110, u16(2)),
                                           (0x00000600, b"STORESCP"), (0x00000700, u16(0)),
                                           (0x00000800, u16(0))]))
    write("command", "c_cancel_rq", command([(0x00000100, u16(0x0FFF)), (0x00000120, u16(2)),
                                             (0x00000800, u16(0x0101))]))

    # C-FIND identifiers (selector 0: implicit VR, Patient Root; 2: implicit, Study Root).
    study = b"".join([el(0x00080020, b"20200101-20201231"), el(0x00080052, b"STUDY"),
                      el(0x00100010, b"DOE*"), el(0x00100020, b""), el(0x0020000D, b"")])
    # sealed: a piece-size byte, then bytes taken as a sealed object (a well-formed header with
    # a forged chunk) and as plaintext to seal and open again.
    header = b"DCPXL2" + bytes([2, 1]) + struct.pack(">I", 65536) + bytes(4)
    write("sealed", "header", bytes([3]) + header + bytes(100))
    write("sealed", "text", bytes([0]) + b"pixel data " * 50)
    write("identifier", "study_level", b"\x02" + study)
    seq = el(0x00081110, el(0xFFFEE000, el(0x00081150, b"")))
    write("identifier", "with_sequence", b"\x00" + el(0x00080052, b"IMAGE") + seq)

    # Data sets from pydicom's corpus: selector 0 implicit LE, 1 explicit LE, 2 explicit BE.
    try:
        from pydicom.data import get_testdata_file
        from pydicom.filereader import read_preamble, _read_file_meta_info
    except ImportError:
        sys.exit("pydicom is needed for the data set seeds")
    import pydicom
    names = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "MR_small_bigendian.dcm",
             "MR_small_implicit.dcm", "JPEG2000.dcm", "SC_rgb_small_odd.dcm"]
    for name in names:
        path = get_testdata_file(name)
        if path is None:
            continue
        with open(path, "rb") as f:
            read_preamble(f, False)
            meta = _read_file_meta_info(f)
            data = f.read()
        ts = str(meta.TransferSyntaxUID)
        sel = 0 if ts == IVLE else 2 if ts == "1.2.840.10008.1.2.2" else 1
        write("split", name.replace(".dcm", ""), bytes([sel]) + data)
        with open(path, "rb") as f:
            whole = f.read()
        write("dicom_header", name.replace(".dcm", ""), bytes([sel]) + whole[:4096])


if __name__ == "__main__":
    main()
