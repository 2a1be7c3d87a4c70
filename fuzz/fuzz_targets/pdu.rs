//! Every byte a peer sends first goes through the PDU codec, and an A-ASSOCIATE-RQ then through
//! our negotiation: neither may panic, allocate beyond the PDU, or accept what it should refuse.
#![no_main]

use dicom_ul::pdu::Pdu;
use dicomchain::dimse::negotiate::{self, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As the node reads: the body bounded by the PDU's own length (checked before by the
    // connection), strict.
    let Ok(Some(pdu)) = dicom_ul::pdu::read_pdu(data, dicom_ul::pdu::MAXIMUM_PDU_SIZE, true) else {
        return;
    };
    if let Pdu::AssociationRQ(rq) = pdu {
        let policy = Policy {
            ae_title: "DICOMCHAIN".into(),
            check_called_ae: data.len() % 2 == 0,
            max_pdu_length: 65536,
        };
        if let Ok((ac, negotiated)) = negotiate::negotiate(&policy, &rq) {
            // Whatever was accepted answers a proposed context, and the answer encodes.
            for c in &negotiated.contexts {
                assert!(rq.presentation_contexts.iter().any(|p| p.id == c.id));
            }
            let mut out = Vec::new();
            dicom_ul::pdu::write_pdu(&mut out, &Pdu::AssociationAC(ac)).expect("AC encodes");
        }
    }
});
