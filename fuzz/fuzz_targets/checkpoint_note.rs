//! Signed checkpoint notes come from outside (a witness, an auditor, a copy of `dicomchain
//! checkpoint`): the note verifier, the checkpoint body parser and the verifier-key parser must
//! refuse any input without panicking, and a note that verifies must parse back to a
//! checkpoint whose body is what was signed.
#![no_main]

use dicomchain::ledger::checkpoint::{self, Checkpoint, NoteSigner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Checkpoint::parse(text);
    let _ = NoteSigner::parse(text);
    // Split the input into a note and a verifier key, to reach the signature checks.
    let (note, key) = text.split_once('\u{0}').unwrap_or((text, ""));
    let _ = checkpoint::verify(note, key);
    // A key of our own: whatever the fuzzer wrote must not verify under it unless signed.
    let signer = NoteSigner::from_seed("fuzz.example/log", [7; 32]).expect("seed key");
    if let Ok(cp) = checkpoint::verify(note, &signer.verifier_key()) {
        assert_eq!(Checkpoint::parse(&cp.body()).map(|c| c.body()).ok(), Some(cp.body()));
    }
});
