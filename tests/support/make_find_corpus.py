#!/usr/bin/env python3
"""Writes a small, varied corpus for C-FIND tests as Part 10 files.

usage: make_find_corpus.py OUTDIR

Four patients, five studies, eight series, 21 instances: CT, MR and SR; names differing only in
case; a legacy "YYYY.MM.DD" date; a study spanning midnight; a sequence with several items;
Latin-1 names; and the three uncompressed transfer syntaxes (explicit and implicit little
endian, explicit big endian). Pixel data are 4x4, so the corpus stays small.
"""
import os
import sys
import warnings

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

ROOT = "1.2.826.0.1.3680043.10.1474.99"
SOP = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "SR": "1.2.840.10008.5.1.4.1.1.88.11",
}

# (patient name, id, birth date, sex, charset)
PATIENTS = {
    1: ("DOE^JOHN", "PID001", "19700101", "M", None),
    2: ("doe^jane", "PID002", "19851231", "F", None),
    3: ("Smith^Anna^^Dr", "PID003", "19600229", "F", None),
    4: ("Müller^Jürgen", "PID004", "19991111", "M", "ISO_IR 100"),
}
# (study no, patient, date, time, accession, study id, description, referring physician)
STUDIES = [
    (1, 1, "20200115", "123000", "ACC001", "1", "CHEST", "House^Gregory"),
    (2, 1, "20200220", "080000", "ACC002", "2", "HEAD", "House^Gregory"),
    (3, 2, "20191231", "235900", "ACC003", "3", "ABDOMEN", "Wilson^James"),
    (4, 3, "2021.03.04", "1015", "ACC004", "4", "KNEE", ""),
    (5, 4, "20220101", "000000", "ACC005", "5", "Schädel", "Cuddy^Lisa"),
]
# (series no, study, modality, instance count, series number, description, syntax)
SERIES = [
    (1, 1, "CT", 3, 1, "AXIAL 5mm", ExplicitVRLittleEndian),
    (2, 1, "CT", 2, 2, "CORONAL", ImplicitVRLittleEndian),
    (3, 2, "MR", 2, 1, "T1 SAG", ExplicitVRLittleEndian),
    (4, 2, "SR", 1, 99, "REPORT", ExplicitVRLittleEndian),
    (5, 3, "CT", 4, 1, "PORTAL VENOUS", ExplicitVRBigEndian),
    (6, 4, "MR", 3, 1, "PD FS", ImplicitVRLittleEndian),
    (7, 4, "MR", 2, 2, "T2 FS", ExplicitVRLittleEndian),
    (8, 5, "CT", 4, 1, "Schädel nativ", ExplicitVRLittleEndian),
]


def main():
    warnings.simplefilter("ignore")  # the legacy date is deliberate
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    studies = {s[0]: s for s in STUDIES}
    n = 0
    for se_no, st_no, modality, count, se_number, se_desc, syntax in SERIES:
        st = studies[st_no]
        name, pid, birth, sex, charset = PATIENTS[st[1]]
        for i in range(1, count + 1):
            n += 1
            sop_uid = f"{ROOT}.3.{se_no}.{i}"
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = SOP[modality]
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = syntax
            ds = Dataset()
            ds.file_meta = meta
            if charset:
                ds.SpecificCharacterSet = charset
            ds.SOPClassUID = SOP[modality]
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = st[2]
            ds.StudyTime = st[3]
            ds.SeriesDate = st[2].replace(".", "")
            ds.AccessionNumber = st[4]
            ds.Modality = modality
            ds.ReferringPhysicianName = st[7]
            ds.StudyDescription = st[6]
            ds.SeriesDescription = se_desc
            ds.PatientName = name
            ds.PatientID = pid
            ds.PatientBirthDate = birth
            ds.PatientSex = sex
            ds.StudyInstanceUID = f"{ROOT}.1.{st_no}"
            ds.SeriesInstanceUID = f"{ROOT}.2.{se_no}"
            ds.StudyID = st[5]
            ds.SeriesNumber = se_number
            ds.InstanceNumber = i
            if se_no in (1, 5):
                items = []
                for rp, sps in (("RP%d" % se_no, "SPS%d" % i), ("RPX%d" % se_no, "SPSX")):
                    item = Dataset()
                    item.RequestedProcedureID = rp
                    item.ScheduledProcedureStepID = sps
                    items.append(item)
                ds.RequestAttributesSequence = Sequence(items)
            if modality != "SR":
                ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if i % 2 else "LOCALIZER"]
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.Rows = 4
                ds.Columns = 4
                ds.BitsAllocated = 16
                ds.BitsStored = 12
                ds.HighBit = 11
                ds.PixelRepresentation = 0
                ds.PixelData = bytes(range(n, n + 32))
            path = os.path.join(out, f"{n:03d}.dcm")
            ds.save_as(
                path,
                implicit_vr=syntax == ImplicitVRLittleEndian,
                little_endian=syntax != ExplicitVRBigEndian,
                enforce_file_format=True,
            )


if __name__ == "__main__":
    main()
