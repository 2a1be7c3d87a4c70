#!/usr/bin/env python3
"""Independent C-FIND oracle: compares a C-FIND SCP's answers with matching computed here.

usage: find_check.py --host H --port P --aec CALLED --aet CALLING
                     --files FILE_OR_DIR [...] --queries queries.json
                     [--combined-datetime] [--case-insensitive-pn]

The Part 10 files that were stored into the SCP are read with pydicom (the last file in the
given order wins for a repeated SOP Instance UID) and grouped into Patient / Study / Series /
Image. For every query in queries.json the expected matches are computed HERE, with a separate
implementation of PS3.4 C.2.2.2 matching (universal, single value, wild card, list of UID,
range, sequence and, with --combined-datetime, combined date-time range matching), sharing no
code with the SCP under test. The query is then sent with pynetdicom's C-FIND SCU and the
returned identifiers are compared with the oracle: unique keys, every requested return key,
QueryRetrieveLevel and RetrieveAETitle.

queries.json is a list of objects:
  {"name", "model": "P"|"S", "level": "PATIENT"|"STUDY"|"SERIES"|"IMAGE", "charset"?,
   "keys": {keyword: unicode string ("" = return key)}, "sequences"?: {keyword: [item dict]},
   "expect_status"?: int, "cancel_after"?: int (>= 1), "cancel_slack"?: int}

Oracle choices where the standard leaves room: a single TM/DT value matches every stored value
within its precision ("10" matches 10:00-10:59:59.999999); time zone offsets are ignored;
IS/DS values without wild cards compare numerically; the query value '""' matches empty values
(Empty Value Matching); an entity lacking an attribute matches only universal keys for it.

stdout is a single JSON report (see report() below); exit status 0 if every query agreed.
"""
import argparse
import json
import logging
import os
import re
import sys
import warnings

from pydicom import config, dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pynetdicom import AE, _config
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
import pynetdicom_race  # noqa: F401  (mends a pynetdicom race that drops responses)

warnings.simplefilter("ignore")
_config.LOG_HANDLER_LEVEL = "none"
for _name in ("pynetdicom", "pydicom"):
    logging.getLogger(_name).setLevel(logging.CRITICAL + 1)
config.settings.reading_validation_mode = config.IGNORE
config.settings.writing_validation_mode = config.IGNORE

MODELS = {"P": "1.2.840.10008.5.1.4.1.2.1.1", "S": "1.2.840.10008.5.1.4.1.2.2.1"}
LEVELS = ["PATIENT", "STUDY", "SERIES", "IMAGE"]
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
          "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
TIMEOUT = 30
CANCEL_SLACK = 100  # responses tolerated after C-CANCEL was sent (in flight on the socket)
NOT_KEYS = {"SpecificCharacterSet", "QueryRetrieveLevel", "TimezoneOffsetFromUTC"}

STUDY_PATIENT_ATTRS = {"PatientAge", "PatientSize", "PatientWeight", "Occupation",
                       "AdditionalPatientHistory"}
STUDY_ATTRS = STUDY_PATIENT_ATTRS | {
    "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
    "StudyInstanceUID", "StudyID", "ModalitiesInStudy", "SOPClassesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"}
SERIES_ATTRS = {"Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription",
                "SeriesDate", "SeriesTime", "BodyPartExamined", "RequestAttributesSequence",
                "NumberOfSeriesRelatedInstances"}
PATIENT_COMPUTED = {"NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                    "NumberOfPatientRelatedInstances"}
SET_VALUED = {"ModalitiesInStudy", "SOPClassesInStudy"}
INT_VRS = {"IS", "US", "UL", "SS", "SL", "UV", "SV"}
FLOAT_VRS = {"DS", "FL", "FD"}


def attr_level(keyword, model):
    """Index into LEVELS of the level an attribute belongs to."""
    if keyword in SERIES_ATTRS:
        return 2
    if keyword in STUDY_ATTRS:
        return 1
    tag = tag_for_keyword(keyword)
    if keyword in PATIENT_COMPUTED or (tag is not None and Tag(tag).group == 0x0010):
        return 1 if model == "S" else 0
    return 3


# ---------------------------------------------------------------- stored data -----------------

class Entity:
    def __init__(self, level, uid):
        self.level, self.uid = level, uid
        self.instances = []      # surviving datasets, in file order
        self.children = {}       # uid -> Entity (insertion = file order)
        self.patient = self.study = self.series = None


def load_files(paths):
    """Returns (surviving datasets in file order, skipped files)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files.extend(os.path.join(root, n) for n in sorted(names))
        else:
            files.append(p)
    latest, skipped = {}, []
    for index, path in enumerate(files):
        try:
            ds = dcmread(path, force=True)
            sop, study = str(ds.get("SOPInstanceUID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")
        except Exception as e:  # not DICOM at all
            skipped.append(f"{path}: {e}")
            continue
        if not sop or not study:
            skipped.append(f"{path}: no SOPInstanceUID/StudyInstanceUID")
            continue
        latest[sop] = (index, ds)  # later sends are new versions
    return [ds for _, ds in sorted(latest.values(), key=lambda t: t[0])], skipped


def build_hierarchy(datasets):
    """Returns {level: {unique key value: Entity}} with parent links."""
    tree = {lvl: {} for lvl in LEVELS}

    def get(level, uid):
        if uid not in tree[level]:
            tree[level][uid] = Entity(level, uid)
        return tree[level][uid]

    for ds in datasets:
        pat = get("PATIENT", str(ds.get("PatientID", "") or ""))
        stu = get("STUDY", str(ds.StudyInstanceUID))
        ser = get("SERIES", str(ds.get("SeriesInstanceUID", "") or ""))
        img = get("IMAGE", str(ds.SOPInstanceUID))
        chain = [pat, stu, ser, img]
        for i, ent in enumerate(chain):
            ent.instances.append(ds)
            ent.patient = ent.patient or pat
            ent.study = ent.study or (stu if i >= 1 else None)
            ent.series = ent.series or (ser if i >= 2 else None)
            if i < 3:
                ent.children.setdefault(chain[i + 1].uid, chain[i + 1])
    return tree


def element(ds, keyword):
    """The data element for a keyword (Dataset.get(keyword) would give its value), or None."""
    return ds[keyword] if keyword in ds else None


def element_strings(ds, keyword):
    """Non-empty values of an attribute of a dataset, as stripped strings."""
    elem = element(ds, keyword)
    if elem is None or elem.value is None or elem.value == "":
        return []
    values = elem.value if elem.VM > 1 or isinstance(elem.value, (list, tuple)) else [elem.value]
    return [str(v).strip() for v in values if v is not None and str(v).strip() != ""]


def computed_value(entity, keyword):
    """Value of a computed (Number..., ...InStudy) attribute, or None if not computed."""
    pat, stu, ser = entity.patient, entity.study, entity.series
    if keyword == "NumberOfPatientRelatedStudies":
        return len(pat.children)
    if keyword == "NumberOfPatientRelatedSeries":
        return sum(len(s.children) for s in pat.children.values())
    if keyword == "NumberOfPatientRelatedInstances":
        return len(pat.instances)
    if stu is not None and keyword == "NumberOfStudyRelatedSeries":
        return len(stu.children)
    if stu is not None and keyword == "NumberOfStudyRelatedInstances":
        return len(stu.instances)
    if ser is not None and keyword == "NumberOfSeriesRelatedInstances":
        return len(ser.instances)
    if stu is not None and keyword == "ModalitiesInStudy":
        return sorted({m for ds in stu.instances for m in element_strings(ds, "Modality")})
    if stu is not None and keyword == "SOPClassesInStudy":
        return sorted({m for ds in stu.instances for m in element_strings(ds, "SOPClassUID")})
    return None


# ---------------------------------------------------------------- matching --------------------

def is_universal(value):
    if isinstance(value, list):  # sequence key: universal if no item or no non-universal sub-key
        return not value or all(is_universal(v) for v in value[0].values())
    return value is None or str(value) == "" or str(value) == "*"


def wildcard(pattern, value, ignore_case=False):
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL | (re.IGNORECASE if ignore_case else 0)) is not None


def pad_time(t, fill):
    """HHMMSS.FFFFFF from a (possibly truncated) TM value, padded with `fill`."""
    t = t.replace(":", "").strip()
    whole, _, frac = t.partition(".")
    return (whole + fill * 6)[:6] + "." + (frac + fill * 6)[:6]


def pad_datetime(t, fill):
    """YYYYMMDDHHMMSS.FFFFFF from a DT value (time zone offset ignored), padded with `fill`."""
    t = re.sub(r"[+-]\d{4}$", "", t.strip())
    whole, _, frac = t.partition(".")
    return (whole + fill * 14)[:14] + "." + (frac + fill * 6)[:6]


DT_VALUE = r"\d{4,14}(?:\.\d{1,6})?(?:[+-]\d{4})?"


def split_range(vr, q):
    """(lower, upper) for a range query ('' for an open end), or None for a single value."""
    if vr == "DT":
        m = re.fullmatch(f"({DT_VALUE})?-({DT_VALUE})?", q)
        return (m.group(1) or "", m.group(2) or "") if m else None
    if "-" in q:
        lo, _, hi = q.partition("-")
        return lo.strip(), hi.strip()
    return None


def temporal_match(vr, q, stored):
    if vr == "DA":
        norm = lambda v, fill: v.replace(".", "").strip()
    elif vr == "TM":
        norm = pad_time
    else:
        norm = pad_datetime
    rng = split_range(vr, q)
    if rng is None:
        lo, hi = norm(q, "0"), norm(q, "9")
    else:
        lo = norm(rng[0], "0") if rng[0] else None
        hi = norm(rng[1], "9") if rng[1] else None
    for s in stored:
        s = norm(s, "0")
        if (lo is None or s >= lo) and (hi is None or s <= hi):
            return True
    return False


def pn_match(q, stored, ignore_case):
    groups = q.split("=")
    for s in stored:
        sgroups = s.split("=")
        ok = True
        for i, g in enumerate(groups):
            g = g.strip(" ").rstrip("^ ")
            if g in ("", "*"):
                continue
            sg = sgroups[i].strip(" ").rstrip("^ ") if i < len(sgroups) else ""
            if not wildcard(g, sg, ignore_case):
                ok = False
                break
        if ok:
            return True
    return False


def value_match(vr, q, stored, opts):
    """Matches one non-universal query value (str) against the stored values (list of str)."""
    q = str(q)
    if q == '""':  # Empty Value Matching
        return not stored
    if not stored:
        return False
    values = [v for v in q.split("\\")]
    if vr == "UI":
        return any(s in values for s in stored)
    for v in values:
        v = v.strip()
        if vr in ("DA", "TM", "DT"):
            hit = temporal_match(vr, v, stored)
        elif vr == "PN":
            hit = pn_match(v, stored, opts.case_insensitive_pn)
        elif vr in INT_VRS | FLOAT_VRS and "*" not in v and "?" not in v:
            try:
                hit = any(float(s) == float(v) for s in stored)
            except ValueError:
                hit = any(s == v for s in stored)
        else:
            hit = any(wildcard(v, s) for s in stored)
        if hit:
            return True
    return False


def sequence_item_matches(item_ds, sub_keys, opts):
    for kw, q in sub_keys.items():
        if is_universal(q):
            continue
        if isinstance(q, list):
            if not any(sequence_item_matches(i, q[0], opts) for i in item_ds.get(kw, None) or []):
                return False
        elif not value_match(dictionary_VR(kw), q, element_strings(item_ds, kw), opts):
            return False
    return True


def entity_matches(entity, query, model, opts):
    level = LEVELS.index(query["level"])
    keys = dict(query.get("keys", {}))
    keys.update(query.get("sequences", {}) or {})
    rep = entity.instances[0]
    combined = (opts.combined_datetime and not is_universal(keys.get("StudyDate"))
                and not is_universal(keys.get("StudyTime"))
                and "-" in str(keys["StudyDate"]) and "-" in str(keys["StudyTime"]))
    if combined and attr_level("StudyDate", model) <= level:
        dlo, _, dhi = str(keys["StudyDate"]).partition("-")
        tlo, _, thi = str(keys["StudyTime"]).partition("-")
        lo = dlo.strip().replace(".", "") + pad_time(tlo, "0") if dlo.strip() else None
        hi = dhi.strip().replace(".", "") + pad_time(thi, "9") if dhi.strip() else None
        d, t = element_strings(rep, "StudyDate"), element_strings(rep, "StudyTime")
        if not d or not t:
            return False
        s = d[0].replace(".", "") + pad_time(t[0], "0")
        if not ((lo is None or s >= lo) and (hi is None or s <= hi)):
            return False
    for kw, q in keys.items():
        if kw in NOT_KEYS or is_universal(q) or attr_level(kw, model) > level:
            continue
        if combined and kw in ("StudyDate", "StudyTime"):
            continue
        if isinstance(q, list):  # sequence: some stored item matches all sub-keys
            if not any(sequence_item_matches(i, q[0], opts) for i in rep.get(kw, None) or []):
                return False
            continue
        computed = computed_value(entity, kw)
        if computed is not None:
            stored = [str(c) for c in (computed if isinstance(computed, list) else [computed])]
        else:
            stored = element_strings(rep, kw)
        vr = "CS" if kw == "ModalitiesInStudy" else dictionary_VR(kw)
        if not value_match(vr, q, stored, opts):
            return False
    return True


# ---------------------------------------------------------------- value comparison ------------

def normalise(elem):
    """Comparable JSON value of a data element (None for absent or empty)."""
    if elem is None or elem.value is None or elem.value == "" or elem.value == []:
        return None
    values = list(elem.value) if elem.VM > 1 else [elem.value]
    out = []
    for v in values:
        try:
            if elem.VR in INT_VRS:
                v = int(v)
            elif elem.VR in FLOAT_VRS:
                v = float(v)
            else:
                v = str(v).strip()
        except (TypeError, ValueError):
            v = str(v).strip()
        out.append(v)
    return out if len(out) > 1 else out[0]


def sequence_projection(items, sub_keys, opts):
    """What a sequence key should/does return: matching items reduced to the requested keys."""
    sub_keys = sub_keys or {}
    if not sub_keys:
        return {"items": len(items)}
    rows = []
    for item in items:
        if sequence_item_matches(item, sub_keys, opts):
            rows.append(json.dumps([[kw, normalise(element(item, kw))] for kw in sorted(sub_keys)
                                    if not isinstance(sub_keys[kw], list)], ensure_ascii=False))
    return sorted(rows)


def expected_value(entity, kw, q, opts):
    if isinstance(q, list):
        return sequence_projection(entity.instances[0].get(kw, None) or [], q[0] if q else {}, opts)
    computed = computed_value(entity, kw)
    if computed is not None:
        return computed
    return normalise(element(entity.instances[0], kw))


def returned_value(ident, kw, q, opts):
    if kw not in ident:
        return "<absent>"
    if isinstance(q, list):
        sub = q[0] if q else {}
        items = ident[kw].value or []
        if not sub:
            return {"items": len(items)}
        # the SCP returns only matching items; project them without re-filtering
        return sorted(json.dumps([[k, normalise(element(i, k))] for k in sorted(sub)
                                  if not isinstance(sub[k], list)], ensure_ascii=False)
                      for i in items)
    value = normalise(ident[kw])
    if kw in SET_VALUED:
        return sorted(set(value if isinstance(value, list) else [value] if value else []))
    return value


# ---------------------------------------------------------------- network ---------------------

def set_key(ds, kw, value):
    tag = tag_for_keyword(kw)
    if tag is None:
        raise ValueError(f"unknown keyword {kw}")
    vr = dictionary_VR(tag)
    if isinstance(value, list):
        ds.add_new(tag, "SQ", Sequence([item_dataset(i) for i in value]))
    elif vr in ("IS", "DS"):  # may hold wild cards or ranges: write the bytes verbatim
        raw = str(value).encode("ascii")
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
    elif vr in INT_VRS | FLOAT_VRS:
        ds.add_new(tag, vr, None if value == "" else (int if vr in INT_VRS else float)(value))
    else:
        ds.add_new(tag, vr, str(value))


def item_dataset(keys):
    item = Dataset()
    for kw, v in keys.items():
        set_key(item, kw, v)
    return item


def build_identifier(query):
    ds = Dataset()
    if query.get("charset"):
        ds.SpecificCharacterSet = query["charset"]
    ds.QueryRetrieveLevel = query["level"]
    for kw, v in query.get("keys", {}).items():
        if kw not in NOT_KEYS:
            set_key(ds, kw, v)
    for kw, items in (query.get("sequences") or {}).items():
        set_key(ds, kw, items)
    unique = UNIQUE.get(query["level"])  # an unknown level (bad-input queries) has none
    if unique and unique not in ds:
        set_key(ds, unique, "")
    return ds


def run_find(args, query, model_uid, identifier):
    """Returns (final status dataset or None, identifiers, errors, accepted extended negotiation)."""
    ae = AE(ae_title=args.aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    for uid in MODELS.values():
        ae.add_requested_context(uid)
    ext_neg = []
    if args.combined_datetime:
        for uid in MODELS.values():
            item = SOPClassExtendedNegotiation()
            item.sop_class_uid = uid
            # PS3.4 C.5.1.1: relational, combined date-time, fuzzy PN, timezone adjustment
            item.service_class_application_information = b"\x00\x01\x00\x00"
            ext_neg.append(item)
    assoc = ae.associate(args.host, args.port, ae_title=args.aec, ext_neg=ext_neg or None)
    if not assoc.is_established:
        return None, [], ["association not established"], None
    accepted = {str(k): list(v) for k, v in assoc.acceptor.sop_class_extended.items()}
    status, idents, errors, pending = None, [], [], 0
    cancel_after = query.get("cancel_after")
    try:
        for st, ident in assoc.send_c_find(identifier, model_uid, msg_id=1):
            if not st or "Status" not in st:
                errors.append("no valid response (timeout, abort or invalid PDU)")
                break
            if st.Status in (0xFF00, 0xFF01):
                pending += 1
                if ident is None:
                    errors.append("pending response without a decodable identifier")
                else:
                    idents.append(ident)
                if cancel_after is not None and pending == max(1, int(cancel_after)):
                    assoc.send_c_cancel(1, query_model=model_uid)
            else:
                status = st
    finally:
        if assoc.is_established:
            assoc.release()
    return status, idents, errors, accepted


def check_query(args, query, tree):
    name, model, level = query.get("name", "?"), query.get("model", "S"), query["level"]
    rep = {"name": name, "model": model, "level": level, "ok": False, "status": None, "status_hex": None,
           "error_comment": None,
           "expected_count": None, "got_count": 0, "missing": [], "unexpected": [],
           "duplicates": [], "value_mismatches": [], "errors": [], "unchecked_keys": []}
    try:
        identifier = build_identifier(query)
        status, idents, errors, accepted = run_find(args, query, MODELS[model], identifier)
    except Exception as e:
        rep["errors"].append(f"{type(e).__name__}: {e}")
        return rep
    if args.combined_datetime:
        rep["ext_neg_accepted"] = accepted
    if status is not None:
        rep["error_comment"] = str(status.get("ErrorComment", "")) or None
        status = int(status.Status)
    rep.update(status=status, status_hex=None if status is None else f"0x{status:04X}",
               got_count=len(idents), errors=errors)
    if "expect_status" in query:
        rep["ok"] = status == int(query["expect_status"]) and not errors
        return rep

    expected = {uid: ent for uid, ent in tree[level].items() if entity_matches(ent, query, model, args)}
    rep["expected_count"] = len(expected)
    unique, got, lvl_index = UNIQUE[level], {}, LEVELS.index(level)
    for ident in idents:
        uid = str(ident.get(unique, "") or "")
        if uid in got:
            rep["duplicates"].append(uid)
        got[uid] = ident
        if str(ident.get("QueryRetrieveLevel", "")).strip() != level:
            errors.append(f"{uid}: QueryRetrieveLevel {ident.get('QueryRetrieveLevel')!r}")
        if not str(ident.get("RetrieveAETitle", "") or "").strip():
            errors.append(f"{uid}: RetrieveAETitle missing or empty")
    if query.get("cancel_after") is None:  # after a C-CANCEL, fewer results are expected
        rep["missing"] = sorted(set(expected) - set(got))
    rep["unexpected"] = sorted(set(got) - set(expected))

    requested = {kw: v for kw, v in query.get("keys", {}).items() if kw not in NOT_KEYS}
    requested.update(query.get("sequences") or {})
    requested.setdefault(unique, "")
    for kw in requested:
        if attr_level(kw, model) > lvl_index:
            rep["unchecked_keys"].append(kw)
    for uid, ident in got.items():
        if uid not in expected:
            continue
        for kw, q in requested.items():
            if kw in rep["unchecked_keys"]:
                continue
            want = expected_value(expected[uid], kw, q, args)
            have = returned_value(ident, kw, q, args)
            if want != have:
                rep["value_mismatches"].append({"tag": str(Tag(tag_for_keyword(kw))), "keyword": kw,
                                                "entity": uid, "expected": want, "got": have})

    if query.get("cancel_after") is not None:
        limit = max(1, int(query["cancel_after"])) + int(query.get("cancel_slack", CANCEL_SLACK))
        rep["ok"] = (status == 0xFE00 and len(idents) <= limit and len(idents) < len(expected)
                     and not rep["unexpected"]
                     and not rep["duplicates"] and not rep["value_mismatches"] and not errors)
    else:
        rep["ok"] = (status == 0x0000 and not rep["missing"] and not rep["unexpected"]
                     and not rep["duplicates"] and not rep["value_mismatches"] and not errors)
    return rep


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--aec", default="DICOMCHAIN", help="called AE title")
    p.add_argument("--aet", default="FINDSCU", help="calling AE title")
    p.add_argument("--files", nargs="+", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--combined-datetime", action="store_true")
    p.add_argument("--case-insensitive-pn", action="store_true")
    p.add_argument("--expect-only", action="store_true",
                   help="print the oracle's expected unique keys per query; contact no SCP")
    args = p.parse_args()

    datasets, skipped = load_files(args.files)
    tree = build_hierarchy(datasets)
    with open(args.queries, encoding="utf-8") as f:
        queries = json.load(f)
    if args.expect_only:
        out = []
        for q in queries:
            level = q["level"]
            out.append({"name": q.get("name", "?"), "level": level,
                        "expected": sorted(uid for uid, ent in tree[level].items()
                                           if entity_matches(ent, q, q.get("model", "S"), args))})
        json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    results = []
    for q in queries:
        try:
            results.append(check_query(args, q, tree))
        except Exception as e:  # malformed query or oracle failure: report, go on
            results.append({"name": q.get("name", "?"), "ok": False,
                            "errors": [f"{type(e).__name__}: {e}"]})
    report = {"ok": all(r["ok"] for r in results), "instances": len(datasets),
              "skipped_files": skipped, "queries": results}
    json.dump(report, sys.stdout, indent=1, ensure_ascii=False, default=str)
    sys.stdout.write("\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
