//! The identifier of a C-FIND/C-MOVE/C-GET is parsed into a query; any bytes must give a query
//! or an error, never a panic, and a parsed identifier re-encodes.
#![no_main]

use dicomchain::query::dataset;
use dicomchain::query::matching::{MatchOptions, Model, Query};
use dicomchain::dicom::Encoding;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&selector, data)) = input.split_first() else {
        return;
    };
    let enc = if selector & 1 == 0 {
        Encoding::ImplicitLittle
    } else {
        Encoding::ExplicitLittle
    };
    let Ok(elements) = dataset::parse(data, enc, false) else {
        return;
    };
    let model = if selector & 2 == 0 {
        Model::PatientRoot
    } else {
        Model::StudyRoot
    };
    let opts = MatchOptions {
        case_insensitive_names: selector & 4 != 0,
        combined_datetime: selector & 8 != 0,
    };
    let _ = Query::parse(&elements, model, opts);
    let mut out = Vec::new();
    dataset::write(&elements, enc, &mut out);
});
