//! The attributes C-FIND computes rather than reads (numbers of related studies, series and
//! instances), counted from the index and cached for the query.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::charset::Charset;
use super::dataset::{self, Element};
use super::error::FindError;
use super::index;
use super::matching::*;
use super::plan::Candidate;
use crate::ledger::{find_key, Ledger, Step};

pub(super) fn is_computed(tag: u32) -> bool {
    matches!(
        tag,
        MODALITIES_IN_STUDY
            | SOP_CLASSES_IN_STUDY
            | PATIENT_RELATED_STUDIES
            | PATIENT_RELATED_SERIES
            | PATIENT_RELATED_INSTANCES
            | STUDY_RELATED_SERIES
            | STUDY_RELATED_INSTANCES
            | SERIES_RELATED_INSTANCES
    )
}

/// The computed attributes of a candidate's patient, study and series, read from the index on
/// first use and kept for the rest of the query (an IMAGE-level query asking Number of Study
/// Related Instances reads each study once, not once per instance).
pub(super) struct Computed<'l, 'c> {
    pub(super) ledger: &'l Ledger,
    pub(super) study: String,
    pub(super) series: String,
    pub(super) patient_id: String,
    pub(super) cache: &'c mut StatsCache,
}

/// Computed attributes read during one query.
#[derive(Default)]
pub(super) struct StatsCache {
    pub(super) studies: HashMap<String, StudyStats>,
    pub(super) series: HashMap<(String, String), usize>,
    pub(super) patients: HashMap<String, (usize, usize, usize)>,
}

#[derive(Default)]
pub(super) struct StudyStats {
    pub(super) series: BTreeSet<String>,
    pub(super) instances: usize,
    pub(super) modalities: BTreeSet<String>,
    pub(super) sop_classes: BTreeSet<String>,
}

impl<'l, 'c> Computed<'l, 'c> {
    pub(super) fn new(
        ledger: &'l Ledger,
        c: &Candidate,
        elements: &[Element<'_>],
        charset: &Charset,
        cache: &'c mut StatsCache,
    ) -> Computed<'l, 'c> {
        Computed {
            ledger,
            study: c.study.clone(),
            series: c.series.clone(),
            // As the index holds it (decoded with the data set's character set).
            patient_id: dataset::find(elements, PATIENT_ID)
                .map(|e| index::index_value(e, charset))
                .unwrap_or_default(),
            cache,
        }
    }

    pub(super) fn study(ledger: &Ledger, study: &str) -> Result<StudyStats, FindError> {
        let mut s = StudyStats::default();
        let prefix = format!("study\0{study}\0").into_bytes();
        ledger.scan(&prefix, b"", |suffix, value| {
            if let Some(series) = suffix.split(|b| *b == 0).next() {
                s.series
                    .insert(String::from_utf8_lossy(series).into_owned());
            }
            s.instances += 1;
            let mut parts = value.split(|b| *b == 0);
            if let Some(class) = parts.next().filter(|c| !c.is_empty()) {
                s.sop_classes
                    .insert(String::from_utf8_lossy(class).into_owned());
            }
            if let Some(m) = parts.next().filter(|m| !m.is_empty()) {
                s.modalities.insert(String::from_utf8_lossy(m).into_owned());
            }
            Step::Next
        })?;
        Ok(s)
    }

    pub(super) fn value(&mut self, tag: u32) -> Result<Option<String>, FindError> {
        let join = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join("\\");
        Ok(Some(match tag {
            MODALITIES_IN_STUDY
            | SOP_CLASSES_IN_STUDY
            | STUDY_RELATED_SERIES
            | STUDY_RELATED_INSTANCES => {
                if !self.cache.studies.contains_key(&self.study) {
                    let stats = Self::study(self.ledger, &self.study)?;
                    self.cache.studies.insert(self.study.clone(), stats);
                }
                let Some(s) = self.cache.studies.get(&self.study) else {
                    return Ok(None);
                };
                match tag {
                    MODALITIES_IN_STUDY => join(&s.modalities),
                    SOP_CLASSES_IN_STUDY => join(&s.sop_classes),
                    STUDY_RELATED_SERIES => s.series.len().to_string(),
                    _ => s.instances.to_string(),
                }
            }
            SERIES_RELATED_INSTANCES => {
                let key = (self.study.clone(), self.series.clone());
                if !self.cache.series.contains_key(&key) {
                    let prefix = format!("study\0{}\0{}\0", self.study, self.series).into_bytes();
                    let mut n = 0;
                    self.ledger.scan(&prefix, b"", |_, _| {
                        n += 1;
                        Step::Next
                    })?;
                    self.cache.series.insert(key.clone(), n);
                }
                self.cache
                    .series
                    .get(&key)
                    .copied()
                    .unwrap_or(0)
                    .to_string()
            }
            PATIENT_RELATED_STUDIES | PATIENT_RELATED_SERIES | PATIENT_RELATED_INSTANCES => {
                if !self.cache.patients.contains_key(&self.patient_id) {
                    let mut prefix = find_key(PATIENT_ID, &self.patient_id);
                    prefix.push(0);
                    let (mut studies, mut series, mut n) = (HashSet::new(), HashSet::new(), 0);
                    self.ledger.scan(&prefix, b"", |suffix, _| {
                        let mut f = suffix.split(|b| *b == 0);
                        if let (Some(st), Some(se)) = (f.next(), f.next()) {
                            studies.insert(st.to_vec());
                            series.insert(se.to_vec());
                        }
                        n += 1;
                        Step::Next
                    })?;
                    self.cache
                        .patients
                        .insert(self.patient_id.clone(), (studies.len(), series.len(), n));
                }
                let (st, se, n) = self
                    .cache
                    .patients
                    .get(&self.patient_id)
                    .copied()
                    .unwrap_or_default();
                match tag {
                    PATIENT_RELATED_STUDIES => st.to_string(),
                    PATIENT_RELATED_SERIES => se.to_string(),
                    _ => n.to_string(),
                }
            }
            _ => return Ok(None),
        }))
    }
}
