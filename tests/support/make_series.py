#!/usr/bin/env python3
"""Writes a synthetic CT or MR series as Part 10 files, for tests and benchmarks.

usage: make_series.py OUTDIR --modality CT --count 1000 [--rows 512 --cols 512] [--studies 1]
                      [--patient-name NAME] [--patient-id ID] [--syntax implicit|explicit]

Each instance carries real-looking pixel data (a gradient plus the instance number, so no two
pixel values are alike) and a full patient/study/series/instance hierarchy.
"""
import argparse
import os

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--modality", default="CT", choices=sorted(SOP))
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--studies", type=int, default=1)
    ap.add_argument("--patient-name", default="DOE^JOHN")
    ap.add_argument("--patient-id", default="PID0001")
    ap.add_argument("--syntax", default="explicit", choices=["implicit", "explicit"])
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ts = ExplicitVRLittleEndian if a.syntax == "explicit" else ImplicitVRLittleEndian
    base = bytearray((i * 7) & 0xFF for i in range(a.rows * a.cols * 2))
    studies = [(generate_uid(), generate_uid()) for _ in range(a.studies)]
    for n in range(a.count):
        study_uid, series_uid = studies[n % a.studies]
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP[a.modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ts
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = SOP[a.modality]
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = "20261125"
        ds.StudyTime = "101500"
        ds.Modality = a.modality
        ds.AccessionNumber = f"ACC{n % a.studies:05d}"
        ds.PatientName = a.patient_name
        ds.PatientID = a.patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [0, 0, n * 1.25]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 1.25
        ds.PixelSpacing = [0.7, 0.7]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = a.rows
        ds.Columns = a.cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if a.modality == "CT":
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.KVP = 120
        else:
            ds.MagneticFieldStrength = 3
            ds.EchoTime = 30
            ds.RepetitionTime = 500
        px = bytearray(base)
        px[0:4] = n.to_bytes(4, "little")
        ds.PixelData = bytes(px)
        ds.is_little_endian = True
        ds.is_implicit_VR = a.syntax == "implicit"
        path = os.path.join(a.out, f"{a.modality}{n:06d}.dcm")
        ds.save_as(path, enforce_file_format=True)


if __name__ == "__main__":
    main()
