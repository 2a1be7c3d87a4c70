#!/usr/bin/env python3
"""Writes CT instances that each carry one large private element, for memory tests.

usage: make_big_private.py OUTDIR --count 16 --mib 60

Each instance is Explicit VR Little Endian with a small pixel matrix and a private OB element
(0009,1010) of MIB mebibytes of random bytes: non-pixel data the node must hold in memory until
the instance is complete. Random, so that no compression makes the copies cheaper than they are.
Prints one path per line.
"""
import argparse
import os

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--mib", type=int, default=60)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for n in range(a.count):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = uid
        ds.Modality = "CT"
        ds.PatientName = "BIG^PRIVATE"
        ds.PatientID = "BIGPRIV"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = n + 1
        ds.add_new(0x00090010, "LO", "DICOMCHAIN TEST")
        ds.add_new(0x00091010, "OB", os.urandom(a.mib * 1024 * 1024))
        ds.Rows, ds.Columns = 8, 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.PixelData = bytes((i * 7 + n) & 0xFF for i in range(128))
        path = os.path.join(a.out, f"big{n:02d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        print(path, flush=True)


if __name__ == "__main__":
    main()
