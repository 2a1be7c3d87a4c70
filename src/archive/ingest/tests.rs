//! Ingest over a real ledger and object store: objects sealed and checked, the master key held
//! to the ledger, reconcile after an interrupted C-STORE, and the memory budget across data sets.

use super::*;
use crate::split::testutil::elem;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

fn dataset(uid: &str) -> Vec<u8> {
    let enc = Encoding::ExplicitLittle;
    let mut d = Vec::new();
    elem(
        enc,
        &mut d,
        0x0008_0016,
        b"UI",
        b"1.2.840.10008.5.1.4.1.1.2\0",
    );
    let mut u = uid.as_bytes().to_vec();
    if u.len() % 2 == 1 {
        u.push(0);
    }
    elem(enc, &mut d, 0x0008_0018, b"UI", &u);
    elem(enc, &mut d, 0x0020_000D, b"UI", b"1.2.3.4\0");
    elem(enc, &mut d, 0x0020_000E, b"UI", b"1.2.3.4.5\0");
    elem(enc, &mut d, 0x7FE0_0010, b"OW", &[7u8; 4096]);
    d
}

async fn pipeline(dir: &std::path::Path) -> Pipeline {
    let ledger = Ledger::open(&dir.join("ledger")).unwrap();
    let store = Store::from_fs(
        crate::store::fs::FsStore::open(&dir.join("objects"))
            .await
            .unwrap(),
    )
    .with_master_key(Some(std::sync::Arc::new(
        crate::store::MasterKey::from_bytes([4; 32]),
    )));
    Pipeline::new(ledger, store, Duration::from_secs(10), 1 << 20)
}

fn ctx(uid: &str) -> StoreContext {
    StoreContext {
        calling_ae: "TEST".into(),
        called_ae: "DICOMCHAIN".into(),
        sop_class_uid: CT.into(),
        sop_instance_uid: uid.into(),
    }
}

#[tokio::test]
async fn objects_are_sealed_and_checked_and_a_store_without_the_master_key_cannot_use_them() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger")).unwrap();
    let objects = dir.path().join("objects");
    let plain = Store::from_fs(crate::store::fs::FsStore::open(&objects).await.unwrap());
    let sealed = plain.clone().with_master_key(Some(std::sync::Arc::new(
        crate::store::MasterKey::from_bytes([4; 32]),
    )));
    let uid = "1.2.3.4.5.8";
    let p = Pipeline::new(
        ledger.clone(),
        sealed.clone(),
        Duration::from_secs(10),
        1 << 20,
    );
    let mut incoming = p.begin("1.2.840.10008.1.2.1");
    incoming.feed(&dataset(uid)).await.unwrap();
    let seq = match incoming.finish(&ctx(uid)).await.unwrap().outcome {
        StoreOutcome::Stored { seq, .. } => seq,
        other => panic!("{other:?}"),
    };
    let rebuild = |seq: u64| {
        let (ledger, sealed) = (ledger.clone(), sealed.clone());
        async move {
            let entry = ledger.entry(seq).unwrap().unwrap();
            let inst = crate::archive::retrieve::load_instance(&ledger, &entry)?;
            let mut out = Vec::new();
            crate::archive::retrieve::rebuild(&sealed, &entry, &inst, &mut out).await?;
            Ok::<_, crate::archive::retrieve::RetrieveError>(out)
        }
    };
    assert_eq!(rebuild(seq).await.unwrap(), dataset(uid));
    let new = ledger.entry(seq).unwrap().unwrap();
    let key = ledger
        .object_key(&new.object_name)
        .unwrap()
        .expect("key record");
    // The sealed object holds none of the pixel bytes ([7; 4096]) in the clear.
    let path = objects.join(&new.object_name[..2]).join(&new.object_name);
    let body = std::fs::read(&path).unwrap();
    assert!(!body.windows(32).any(|w| w == [7u8; 32]));
    // Without the master key it cannot be read, and says why; nor can anything be written.
    assert!(matches!(
        plain.open_read(&new.object_name, &key).await,
        Err(StoreError::NoMasterKey { .. })
    ));
    assert!(matches!(
        plain.begin().await,
        Err(StoreError::NoMasterKeyToSeal)
    ));
    // An altered sealed object is damage (an integrity failure), not an outage.
    let mut altered = body.clone();
    altered[40] ^= 1;
    std::fs::write(&path, altered).unwrap();
    let e = rebuild(seq).await.unwrap_err();
    assert_eq!(
        e.integrity_reason(),
        Some(crate::ledger::Reason::Pixel),
        "{e}"
    );
}

#[test]
fn the_master_key_is_held_to_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger")).unwrap();
    let path = dir.path().join("master.key");
    // First start: created, and its check value kept.
    let key = master_key(&ledger, &path).unwrap();
    assert_eq!(
        ledger.master_check().unwrap().as_deref(),
        Some(&key.check_value()[..])
    );
    assert_eq!(
        master_key(&ledger, &path).unwrap().check_value(),
        key.check_value()
    );
    // Another key file, or none at all: refused, nothing created.
    std::fs::write(&path, "11".repeat(32)).unwrap();
    let e = master_key(&ledger, &path).unwrap_err();
    assert!(
        e.contains("master.key") && e.contains("not the master key"),
        "{e}"
    );
    assert!(read_master_key(&ledger, &path).is_err());
    std::fs::remove_file(&path).unwrap();
    let e = master_key(&ledger, &path).unwrap_err();
    assert!(e.contains("missing"), "{e}");
    assert!(!path.exists());
    assert!(read_master_key(&ledger, &path).unwrap().is_none());
}

#[tokio::test]
async fn reconcile_deletes_only_objects_the_ledger_does_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path()).await;
    let mut incoming = p.begin("1.2.840.10008.1.2.1");
    incoming.feed(&dataset("1.2.3.4.5.6")).await.unwrap();
    let stored = incoming.finish(&ctx("1.2.3.4.5.6")).await.unwrap();
    let StoreOutcome::Stored { seq, .. } = stored.outcome else {
        panic!("stored")
    };
    let kept = p.ledger().entry(seq).unwrap().unwrap().object_name;
    assert!(p.ledger().object_key(&kept).unwrap().is_some());
    // The note stays until the next group, which deletes it: the object is durable now.
    assert_eq!(p.ledger().pending_objects().unwrap().len(), 1);
    // A re-send is a duplicate: its own (sealed, differently named) object is deleted.
    let mut again = p.begin("1.2.840.10008.1.2.1");
    again.feed(&dataset("1.2.3.4.5.6")).await.unwrap();
    let dup = again.finish(&ctx("1.2.3.4.5.6")).await.unwrap();
    assert_eq!(dup.outcome, StoreOutcome::Duplicate { seq });
    assert_eq!(p.store().list().await.unwrap(), vec![kept.clone()]);
    assert!(p.ledger().pending_objects().unwrap().is_empty());

    // A crash after an object commit, before its entry: the note and the object remain.
    let orphan_key = [9u8; 32];
    let orphan = hex::encode(orphan_key);
    p.ledger()
        .intend_object(&orphan, &orphan_key)
        .await
        .unwrap();
    let mut up = p.store().begin().await.unwrap();
    up.write(b"pixels").await.unwrap();
    up.commit(&orphan).await.unwrap();
    // A note whose deletion was lost, for an object the ledger does name.
    p.ledger()
        .intend_object(&kept, &stored.instance_key)
        .await
        .unwrap();
    // A crash after the entries were written, before their objects were durable (a power
    // loss): one object is gone, another cut short. Their notes are still there.
    let path = |name: &str| dir.path().join("objects").join(&name[..2]).join(name);
    let mut lost = Vec::new();
    for uid in ["1.2.3.4.5.7", "1.2.3.4.5.8"] {
        let mut incoming = p.begin("1.2.840.10008.1.2.1");
        incoming.feed(&dataset(uid)).await.unwrap();
        let s = incoming.finish(&ctx(uid)).await.unwrap();
        let StoreOutcome::Stored { seq, .. } = s.outcome else {
            panic!("stored")
        };
        let name = p.ledger().entry(seq).unwrap().unwrap().object_name;
        p.ledger()
            .intend_object(&name, &s.instance_key)
            .await
            .unwrap();
        lost.push((uid, seq, name));
    }
    std::fs::remove_file(path(&lost[0].2)).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path(&lost[1].2))
        .unwrap();
    f.set_len(f.metadata().unwrap().len() - 20).unwrap();

    assert_eq!(reconcile(p.ledger(), p.store()).await.unwrap(), 3);
    assert!(!p.store().exists(&orphan).await.unwrap());
    assert!(p.store().exists(&kept).await.unwrap());
    assert!(p.ledger().pending_objects().unwrap().is_empty());
    assert!(!p.ledger().is_unacknowledged(seq).unwrap());
    for (uid, seq, name) in &lost {
        assert!(p.ledger().is_unacknowledged(*seq).unwrap(), "{uid}");
        assert!(!p.store().exists(name).await.unwrap(), "{uid}");
        // The sender got no success and sends it again: stored anew, as its next version.
        let mut incoming = p.begin("1.2.840.10008.1.2.1");
        incoming.feed(&dataset(uid)).await.unwrap();
        let s = incoming.finish(&ctx(uid)).await.unwrap();
        assert!(
            matches!(s.outcome, StoreOutcome::Stored { version: 2, .. }),
            "{uid}: {:?}",
            s.outcome
        );
    }
    let head = p.ledger().head().unwrap().unwrap().0;
    let events: Vec<_> = (1..=head)
        .filter_map(|s| p.ledger().entry(s).unwrap())
        .filter(|e| e.event == crate::ledger::Event::IntegrityFailure)
        .map(|e| (e.subject_seq, e.reason))
        .collect();
    assert_eq!(
        events,
        [
            (lost[0].1, crate::ledger::Reason::Unacknowledged),
            (lost[1].1, crate::ledger::Reason::Unacknowledged)
        ]
    );
    // Nothing left to do the second time.
    assert_eq!(reconcile(p.ledger(), p.store()).await.unwrap(), 0);
}

#[tokio::test]
async fn the_budget_bounds_bytes_held_across_data_sets() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Budget::new(300_000, Duration::from_millis(200));
    let p = pipeline(dir.path()).await.with_budget(budget);
    let held = || p.budget().unwrap().held();
    // Deflated data sets are kept whole in memory, charged for `COPIES` of their bytes.
    let mut a = p.begin(crate::dicom::uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN);
    a.feed(&[0u8; 60_000]).await.unwrap();
    assert_eq!(held(), 3 * 60_000);
    // A data set that holds some and needs more than is free fails at once.
    let mut b = p.begin(crate::dicom::uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN);
    b.feed(&[0u8; 30_000]).await.unwrap();
    let err = b.feed(&[0u8; 30_000]).await.unwrap_err();
    assert!(
        matches!(err, IngestError::MemoryBudget { max: 300_000 }),
        "{err}"
    );
    b.abort().await;
    assert_eq!(held(), 3 * 60_000);
    // One that holds nothing waits up to the budget's wait, then fails.
    let mut e = p.begin(crate::dicom::uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN);
    let started = std::time::Instant::now();
    let err = e.feed(&[0u8; 50_000]).await.unwrap_err();
    assert!(matches!(err, IngestError::MemoryBudget { .. }), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    e.abort().await;
    assert_eq!(held(), 3 * 60_000);
    // Bytes come back when a data set ends, and a waiting one gets them.
    let mut c = p.begin(crate::dicom::uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN);
    let waiting = tokio::spawn(async move { c.feed(&[0u8; 50_000]).await.map(|_| c) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.abort().await;
    let c = waiting.await.unwrap().unwrap();
    assert_eq!(held(), 3 * 50_000);
    drop(c);
    assert_eq!(held(), 0);
    // One data set larger than the whole budget fails at once.
    let mut d = p.begin(crate::dicom::uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN);
    let err = d.feed(&vec![0u8; 100_001]).await.unwrap_err();
    assert!(matches!(err, IngestError::MemoryBudget { .. }), "{err}");
}
