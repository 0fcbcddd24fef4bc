use super::*;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

fn digest(n: u8) -> Digest {
    Digest(*blake3::hash(&[n]).as_bytes())
}

fn store(dir: &Path) -> Store {
    Store::open(&dir.join("cache"), "ns", None).unwrap()
}

fn hit(l: Lookup) -> Vec<u8> {
    match l {
        Lookup::Hit { payload, .. } => payload,
        other => panic!("expected a hit, got {other:?}"),
    }
}

fn corrupt(l: Lookup) -> (String, Fate) {
    match l {
        Lookup::Corrupt { corruption, fate } => (corruption.reason, fate),
        other => panic!("expected corrupt, got {other:?}"),
    }
}

#[test]
fn namespace_validation() {
    assert!(validate_namespace("cpu-abc_1.2").is_ok());
    for bad in ["", "..", "a/b", "x y", &"a".repeat(129)] {
        assert!(validate_namespace(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn put_get_round_trip_and_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = digest(2);
    assert!(matches!(s.get(&d).unwrap(), Lookup::Miss));
    assert!(!s.contains(&d));
    s.put(&d, b"compiled", 1.25).unwrap();
    assert!(s.contains(&d));
    match s.get(&d).unwrap() {
        Lookup::Hit {
            payload,
            compile_seconds,
            kind,
        } => {
            assert_eq!(payload, b"compiled");
            assert_eq!(compile_seconds, 1.25);
            assert_eq!(kind, ArtifactKind::Piece);
        }
        other => panic!("{other:?}"),
    }
    let path = s.object_path(&d);
    assert!(path.starts_with(tmp.path().join("cache/v1/ns/objects")));
    assert_eq!(path.parent().unwrap().file_name().unwrap(), &d.hex()[..2]);
    let mode = fs::metadata(&path).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dmode = fs::metadata(s.dir()).unwrap().mode() & 0o777;
    assert_eq!(dmode, 0o700);
    assert_eq!(fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
    assert!(s.remove(&d).unwrap());
    assert!(!s.remove(&d).unwrap());
    assert!(matches!(s.get(&d).unwrap(), Lookup::Miss));
}

#[test]
fn overwrite_replaces_whole_file() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = digest(3);
    s.put(&d, &vec![1u8; 1000], 0.0).unwrap();
    s.put(&d, b"short", 0.0).unwrap();
    assert_eq!(hit(s.get(&d).unwrap()), b"short");
}

fn corrupt_with(f: impl FnOnce(&mut Vec<u8>)) -> (Lookup, Store, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = digest(4);
    s.put(&d, b"some payload bytes", 0.0).unwrap();
    let path = s.object_path(&d);
    let mut bytes = fs::read(&path).unwrap();
    f(&mut bytes);
    fs::write(&path, &bytes).unwrap();
    (s.get(&d).unwrap(), s, tmp)
}

fn assert_quarantined(l: Lookup, s: &Store, needle: &str) {
    let (reason, fate) = corrupt(l);
    assert!(reason.contains(needle), "{reason}");
    match fate {
        Fate::Quarantined(q) => {
            assert!(q.starts_with(s.quarantine_dir()));
            assert!(fs::symlink_metadata(&q).is_ok());
        }
        other => panic!("expected a move to quarantine, got {other:?}"),
    }
    assert!(!s.contains(&digest(4)));
}

#[test]
fn bit_flip_in_payload_is_quarantined() {
    let (l, s, _t) = corrupt_with(|b| {
        let n = b.len() - 1;
        b[n] ^= 1
    });
    assert_quarantined(l, &s, "checksum");
}

#[test]
fn truncation_is_quarantined() {
    let (l, s, _t) = corrupt_with(|b| b.truncate(b.len() - 3));
    assert_quarantined(l, &s, "length");
    let (l, s, _t) = corrupt_with(|b| b.truncate(20));
    assert_quarantined(l, &s, "truncated");
}

#[test]
fn foreign_version_and_magic_are_quarantined() {
    let (l, s, _t) = corrupt_with(|b| b[8] = 9);
    assert_quarantined(l, &s, "version");
    let (l, s, _t) = corrupt_with(|b| b[0] = b'X');
    assert_quarantined(l, &s, "magic");
}

#[test]
fn a_header_claiming_a_huge_payload_is_refused_without_reading_it() {
    let (l, s, _t) = corrupt_with(|b| b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()));
    assert_quarantined(l, &s, "limit");
    let (l, s, _t) = corrupt_with(|b| b[16..24].copy_from_slice(&1000u64.to_le_bytes()));
    assert_quarantined(l, &s, "length mismatch");
}

#[test]
fn file_under_wrong_digest_is_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    s.put(&digest(5), b"x", 0.0).unwrap();
    let target = s.object_path(&digest(4));
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fs::copy(s.object_path(&digest(5)), &target).unwrap();
    assert_quarantined(s.get(&digest(4)).unwrap(), &s, "another digest");
}

#[test]
fn signatures() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cache");
    let key = crate::key::signing_key(b"a secret of 16+ bytes").unwrap();
    let signed = Store::open(&root, "ns", Some(key)).unwrap();
    let plain = Store::open(&root, "ns", None).unwrap();
    let other_key = crate::key::signing_key(b"another secret, 16+").unwrap();
    let other = Store::open(&root, "ns", Some(other_key)).unwrap();
    let d = digest(6);
    signed.put(&d, b"payload", 0.0).unwrap();
    assert!(matches!(plain.get(&d).unwrap(), Lookup::Hit { .. }));
    assert!(matches!(signed.get(&d).unwrap(), Lookup::Hit { .. }));
    assert!(corrupt(other.get(&d).unwrap()).0.contains("signature"));
    plain.put(&d, b"payload", 0.0).unwrap();
    assert!(corrupt(signed.get(&d).unwrap()).0.contains("not signed"));
}

#[test]
fn symlinked_object_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = digest(7);
    let evil = tmp.path().join("evil");
    fs::write(
        &evil,
        file_image(&d, b"evil", 0.0, None, ArtifactKind::Piece),
    )
    .unwrap();
    let target = s.object_path(&d);
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    symlink(&evil, &target).unwrap();
    assert!(corrupt(s.get(&d).unwrap()).0.contains("symbolic link"));
    assert!(evil.exists(), "the link target is never touched");
    assert!(
        fs::symlink_metadata(&target).is_err(),
        "the link itself moved"
    );
}

#[test]
fn insecure_roots_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let open = tmp.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let err = Store::open(&open, "ns", None).err().unwrap();
    assert!(matches!(err, Error::InsecureStore { .. }), "{err}");
    assert!(err.to_string().contains("chmod go-w"));
    let link = tmp.path().join("link");
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    symlink(&real, &link).unwrap();
    for p in [link.clone(), tmp.path().join("link/")] {
        assert!(matches!(
            Store::open(&p, "ns", None),
            Err(Error::InsecureStore { .. })
        ));
    }
    assert!(
        !real.join("v1").exists(),
        "nothing was created through the link"
    );
}

#[test]
fn an_open_store_keeps_its_directory_when_the_path_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cache");
    let s = Store::open(&root, "ns", None).unwrap();
    let d = digest(60);
    s.put(&d, b"genuine", 0.0).unwrap();
    // Someone renames the root away and puts a tree of their own in its place.
    fs::rename(&root, tmp.path().join("moved")).unwrap();
    let planted = Store::open(&root, "ns", None).unwrap();
    planted.put(&d, b"planted", 0.0).unwrap();
    planted.put(&digest(61), b"planted", 0.0).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(hit(s.get(&d).unwrap()), b"genuine");
    assert!(matches!(s.get(&digest(61)).unwrap(), Lookup::Miss));
    // ... or a symbolic link to it.
    fs::rename(&root, tmp.path().join("planted")).unwrap();
    symlink(tmp.path().join("planted"), &root).unwrap();
    assert_eq!(hit(s.get(&d).unwrap()), b"genuine");
    assert!(matches!(s.get(&digest(61)).unwrap(), Lookup::Miss));
    s.put(&digest(62), b"new", 0.0).unwrap();
    assert!(tmp.path().join("moved").join("v1/ns").exists());
    assert!(!tmp
        .path()
        .join("planted/v1/ns/objects")
        .join(&digest(62).hex()[..2])
        .exists());
}

#[test]
fn fifos_directories_and_foreign_files_are_misses_that_never_block() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let shard = s.object_path(&digest(70)).parent().unwrap().to_owned();
    fs::create_dir_all(&shard).unwrap();
    // A FIFO: opening it for reading would block without O_NONBLOCK.
    let fifo = s.object_path(&digest(70));
    let shard_fd = crate::store::fs::open_dir_at(rustix::fs::CWD, &shard).unwrap();
    rustix::fs::mkfifoat(
        &shard_fd,
        digest(70).hex().as_str(),
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
    )
    .unwrap();
    let (reason, fate) = corrupt(s.get(&digest(70)).unwrap());
    assert!(reason.contains("FIFO"), "{reason}");
    assert!(matches!(fate, Fate::Quarantined(_)));
    assert!(fs::symlink_metadata(&fifo).is_err());
    // A directory where a file belongs.
    let dir = s.object_path(&digest(71));
    fs::create_dir_all(dir.join("inner")).unwrap();
    let (reason, _) = corrupt(s.get(&digest(71)).unwrap());
    assert!(reason.contains("directory"), "{reason}");
    s.put(&digest(71), b"fine again", 0.0).unwrap();
    assert_eq!(hit(s.get(&digest(71)).unwrap()), b"fine again");
    // A file others may write.
    s.put(&digest(72), b"x", 0.0).unwrap();
    fs::set_permissions(
        s.object_path(&digest(72)),
        fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    assert!(corrupt(s.get(&digest(72)).unwrap())
        .0
        .contains("writable by others"));
    assert_eq!(s.quarantined().len(), 3);
}

#[test]
fn read_only_stores_create_clean_and_move_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cache");
    assert!(matches!(
        Store::open_existing(&root, "ns", None),
        Err(Error::NoStore { .. })
    ));
    assert!(!root.exists());
    let s = Store::open(&root, "ns", None).unwrap();
    s.put(&digest(80), b"good", 1.0).unwrap();
    s.put(&digest(81), b"bad", 1.0).unwrap();
    let bad = s.object_path(&digest(81));
    let mut b = fs::read(&bad).unwrap();
    *b.last_mut().unwrap() ^= 1;
    fs::write(&bad, b).unwrap();
    let stale = s.tmp_dir().join("x.1.0.tmp");
    fs::write(&stale, b"").unwrap();
    fs::remove_dir(s.dir().join("leases")).unwrap();
    drop(s);
    let ro = Store::open_existing(&root, "ns", None).unwrap();
    assert!(!ro.is_writable());
    assert_eq!(ro.list().unwrap().len(), 2);
    assert_eq!(hit(ro.get(&digest(80)).unwrap()), b"good");
    assert_eq!(corrupt(ro.get(&digest(81)).unwrap()).1, Fate::LeftInPlace);
    assert_eq!(ro.verify(false).unwrap().bad.len(), 1);
    assert!(matches!(ro.verify(true), Err(Error::ReadOnly { .. })));
    assert!(matches!(
        ro.put(&digest(82), b"x", 0.0),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(ro.clear(), Err(Error::ReadOnly { .. })));
    assert!(matches!(ro.gc(0), Err(Error::ReadOnly { .. })));
    assert_eq!(ro.clean_tmp(Duration::ZERO), 0);
    assert!(!ro.lease_held(&digest(80)));
    assert!(bad.exists() && stale.exists());
    assert!(!root.join("v1/ns/leases").exists());
}

/// Every path under `dir` with its kind, size, mode and modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, bool, u64, u32, i64, i64)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(p) = pending.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        out.push((
            p.clone(),
            m.is_dir(),
            m.len(),
            m.mode(),
            m.mtime(),
            m.mtime_nsec(),
        ));
        if m.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                pending.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

fn chmod_tree(dir: &Path, dirs: u32, files: u32) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            chmod_tree(&p, dirs, files);
        } else {
            fs::set_permissions(&p, fs::Permissions::from_mode(files)).unwrap();
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(dirs)).unwrap();
}

#[test]
fn base_stores_read_read_only_trees_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("base");
    assert!(matches!(
        Store::open_base(&root, "ns", None),
        Err(Error::NoStore { .. })
    ));
    assert!(!root.exists(), "opening a missing base creates nothing");
    let s = Store::open(&root, "ns", None).unwrap();
    s.put(&digest(90), b"good", 1.5).unwrap();
    s.put(&digest(91), b"bad", 1.0).unwrap();
    let bad = s.object_path(&digest(91));
    let mut b = fs::read(&bad).unwrap();
    *b.last_mut().unwrap() ^= 1;
    fs::write(&bad, b).unwrap();
    drop(s);
    // As an image layer ships it: everything read-only, no leases or tmp directory.
    fs::remove_dir(root.join("v1/ns/leases")).unwrap();
    fs::remove_dir(root.join("v1/ns/tmp")).unwrap();
    chmod_tree(&root, 0o555, 0o444);
    let before = snapshot(&root);
    let base = Store::open_base(&root, "ns", None).unwrap();
    assert!(!base.is_writable());
    assert_eq!(base.owners(), Owners::MeOrRoot);
    match base.get(&digest(90)).unwrap() {
        Lookup::Hit {
            payload,
            compile_seconds,
            ..
        } => assert_eq!((payload.as_slice(), compile_seconds), (&b"good"[..], 1.5)),
        other => panic!("{other:?}"),
    }
    assert_eq!(corrupt(base.get(&digest(91)).unwrap()).1, Fate::LeftInPlace);
    assert!(matches!(base.get(&digest(92)).unwrap(), Lookup::Miss));
    assert!(matches!(
        base.lease(&digest(92), Duration::ZERO),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(
        base.put(&digest(92), b"x", 0.0),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(
        base.remove(&digest(90)),
        Err(Error::ReadOnly { .. })
    ));
    assert_eq!(base.list().unwrap().len(), 2);
    assert_eq!(snapshot(&root), before, "a base store is never written");
    // With a key, its unsigned artifacts are refused (and still left in place).
    let key = crate::key::signing_key(b"a secret of 16+ bytes").unwrap();
    let keyed = Store::open_base(&root, "ns", Some(key)).unwrap();
    let (reason, fate) = corrupt(keyed.get(&digest(90)).unwrap());
    assert!(reason.contains("not signed"), "{reason}");
    assert_eq!(fate, Fate::LeftInPlace);
    assert_eq!(snapshot(&root), before);
    // Trusted like a store root: nothing in it writable by others.
    fs::set_permissions(root.join("v1/ns"), fs::Permissions::from_mode(0o757)).unwrap();
    assert!(matches!(
        Store::open_base(&root, "ns", None),
        Err(Error::InsecureStore { .. })
    ));
    fs::set_permissions(root.join("v1/ns"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::set_permissions(&bad, fs::Permissions::from_mode(0o666)).unwrap();
    let base = Store::open_base(&root, "ns", None).unwrap();
    let (reason, _) = corrupt(base.get(&digest(91)).unwrap());
    assert!(reason.contains("writable by others"), "{reason}");
    chmod_tree(&root, 0o755, 0o644);
}

#[test]
fn owners_of_a_base_include_root() {
    let me = super::fs::my_uid();
    assert!(Owners::Me.trusts(me) && Owners::MeOrRoot.trusts(me));
    assert!(Owners::MeOrRoot.trusts(0));
    assert_eq!(Owners::Me.trusts(0), me == 0);
    let other = if me == 4242 { 4243 } else { 4242 };
    assert!(!Owners::Me.trusts(other) && !Owners::MeOrRoot.trusts(other));
    assert!(Owners::MeOrRoot.describe().ends_with("or root"));
}

#[test]
fn list_reports_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    s.put(&digest(8), b"aaaa", 2.0).unwrap();
    s.put(&digest(9), b"bb", 3.0).unwrap();
    let l = s.list().unwrap();
    assert_eq!(l.len(), 2);
    let total: f64 = l.iter().map(|o| o.compile_seconds).sum();
    assert_eq!(total, 5.0);
    assert!(l.iter().all(|o| o.size > HEADER_LEN as u64));
}

fn set_mtime(p: &Path, secs: u64) {
    File::options()
        .append(true)
        .open(p)
        .unwrap()
        .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

#[test]
fn gc_evicts_least_recently_used_first() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    for n in 20..25u8 {
        s.put(&digest(n), &vec![n; 1000], 0.0).unwrap();
        // distinct mtimes, oldest first
        set_mtime(&s.object_path(&digest(n)), 1_000_000 + n as u64);
    }
    // A load refreshes recency: 20 becomes the newest.
    assert!(matches!(s.get(&digest(20)).unwrap(), Lookup::Hit { .. }));
    let per = HEADER_LEN as u64 + 1000;
    let r = s.gc(3 * per).unwrap();
    assert_eq!(r.removed, 2);
    assert_eq!(r.freed_bytes, 2 * per);
    assert_eq!(r.remaining_bytes, 3 * per);
    assert!(s.contains(&digest(20)));
    assert!(!s.contains(&digest(21)) && !s.contains(&digest(22)));
    assert!(s.contains(&digest(23)) && s.contains(&digest(24)));
    assert_eq!(s.gc(u64::MAX).unwrap().removed, 0);
}

#[test]
fn the_size_cap_counts_the_quarantine_and_removes_it_first() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    s.put(&digest(90), &[1u8; 1000], 0.0).unwrap();
    s.put(&digest(91), &[2u8; 1000], 0.0).unwrap();
    let p = s.object_path(&digest(91));
    let mut b = fs::read(&p).unwrap();
    b[HEADER_LEN] ^= 1;
    fs::write(&p, b).unwrap();
    assert!(matches!(
        s.get(&digest(91)).unwrap(),
        Lookup::Corrupt { .. }
    ));
    let per = HEADER_LEN as u64 + 1000;
    assert_eq!(s.total_bytes().unwrap(), 2 * per);
    let r = s.gc(per).unwrap();
    assert_eq!((r.removed, r.quarantine_removed), (0, 1));
    assert_eq!(r.remaining_bytes, per);
    assert!(s.contains(&digest(90)) && s.quarantined().is_empty());
}

#[test]
fn the_quarantine_is_capped_and_aged_out() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let q = s.quarantine_dir();
    let old = SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
    let old_nanos = old.duration_since(UNIX_EPOCH).unwrap().as_nanos();
    fs::write(q.join(format!("{}.{old_nanos}", digest(1).hex())), b"old").unwrap();
    fs::create_dir_all(q.join(format!("ab.{}", old_nanos + 1)).join("deep")).unwrap();
    fs::write(
        q.join(format!("ab.{}", old_nanos + 1)).join("deep/f"),
        b"12",
    )
    .unwrap();
    assert_eq!(s.quarantined().len(), 2);
    assert_eq!(s.quarantined().iter().map(|e| e.size).sum::<u64>(), 5);
    let r = s.gc(u64::MAX).unwrap();
    assert_eq!(r.quarantine_removed, 2);
    assert!(s.quarantined().is_empty());
    // Over the count cap, the oldest go first.
    for i in 0..(gc::QUARANTINE_MAX_FILES + 5) {
        s.put(&digest(100), b"x", 0.0).unwrap();
        let p = s.object_path(&digest(100));
        fs::write(&p, format!("garbage {i}")).unwrap();
        assert!(matches!(
            s.get(&digest(100)).unwrap(),
            Lookup::Corrupt { .. }
        ));
    }
    let left = s.quarantined();
    assert_eq!(left.len(), gc::QUARANTINE_MAX_FILES);
    assert!(left
        .windows(2)
        .all(|w| w[0].quarantined_at <= w[1].quarantined_at));
}

#[test]
fn verify_reports_and_fixes_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    s.put(&digest(30), b"good", 0.0).unwrap();
    s.put(&digest(31), b"will rot", 0.0).unwrap();
    let p = s.object_path(&digest(31));
    let mut b = fs::read(&p).unwrap();
    b[HEADER_LEN] ^= 0x40;
    fs::write(&p, b).unwrap();
    let r = s.verify(false).unwrap();
    assert_eq!((r.checked, r.pieces, r.models), (2, 1, 0));
    assert_eq!(r.bad.len(), 1);
    assert_eq!(r.bad[0].name, digest(31).hex());
    assert_eq!(r.bad[0].corruption.kind, CorruptionKind::Checksum);
    assert_eq!(r.bad[0].fate, None);
    assert!(p.exists(), "without fix nothing moves");
    let r = s.verify(true).unwrap();
    assert_eq!(r.bad.len(), 1);
    assert!(matches!(r.bad[0].fate, Some(Fate::Quarantined(_))));
    assert!(!p.exists());
    let r = s.verify(false).unwrap();
    assert_eq!((r.checked, r.bad.len()), (1, 0));
}

#[test]
fn tmp_files_are_judged_by_their_lock_not_a_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    // Named after a pid that does not exist (or lives in another PID
    // namespace), but its writer holds the lock: it stays.
    let w = s.writable().unwrap();
    let live =
        tmp::TempFile::create(w.tmp, &format!("{}.{}", digest(1).hex(), i32::MAX - 7)).unwrap();
    // Named after this live process, but nobody holds its lock: it goes.
    let dead = s
        .tmp_dir()
        .join(format!("{}.{}.0.tmp", digest(1).hex(), std::process::id()));
    fs::write(&dead, b"partial").unwrap();
    assert_eq!(s.clean_tmp(TMP_MAX_AGE), 1);
    assert!(!dead.exists() && s.tmp_dir().join(&live.name).exists());
    // Opening the store cleans up too.
    fs::write(&dead, b"partial").unwrap();
    let _again = store(tmp.path());
    assert!(!dead.exists());
    drop(live);
    assert_eq!(s.clean_tmp(TMP_MAX_AGE), 1);
}

#[test]
fn usage_counters_accumulate() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let t = Duration::from_secs(10);
    assert_eq!(s.usage(), UsageStats::default());
    let d = UsageStats {
        hits: 2,
        misses: 1,
        saved_seconds: 1.5,
        remote_hits: 1,
        ..Default::default()
    };
    s.record_usage(d, t).unwrap();
    let total = s.record_usage(d, t).unwrap().unwrap();
    assert_eq!(total.hits, 4);
    assert_eq!(s.usage().misses, 2);
    assert_eq!(s.usage().saved_seconds, 3.0);
    assert_eq!(s.usage().remote_hits, 2);
    // An older 24-byte counters file still reads.
    fs::write(s.dir().join("stats"), &total.encode()[..24]).unwrap();
    assert_eq!(s.usage().hits, 4);
    assert_eq!(s.usage().remote_hits, 0);
}

#[test]
fn usage_is_not_updated_without_its_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let one = UsageStats {
        hits: 1,
        ..Default::default()
    };
    s.record_usage(one, Duration::from_secs(1)).unwrap();
    let held = Lease::try_acquire(&s.ns, "stats.lock").unwrap().unwrap();
    let start = std::time::Instant::now();
    assert_eq!(
        s.record_usage(one, Duration::from_millis(50)).unwrap(),
        None
    );
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert_eq!(s.usage().hits, 1, "skipped, not written without the lock");
    drop(held);
    assert_eq!(
        s.record_usage(one, Duration::from_secs(1))
            .unwrap()
            .unwrap()
            .hits,
        2
    );
}

#[test]
fn symlinked_shard_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = digest(40);
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(
        elsewhere.join(d.hex()),
        file_image(&d, b"evil", 0.0, None, ArtifactKind::Piece),
    )
    .unwrap();
    let shard = s.object_path(&d).parent().unwrap().to_owned();
    symlink(&elsewhere, &shard).unwrap();
    assert!(matches!(s.get(&d).unwrap(), Lookup::Corrupt { .. }));
    assert!(elsewhere.join(d.hex()).exists());
}

#[test]
fn put_moves_a_symlinked_shard_aside_and_publishes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = digest(43);
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let shard = s.object_path(&d).parent().unwrap().to_owned();
    symlink(&elsewhere, &shard).unwrap();
    s.put(&d, b"published", 0.0).unwrap();
    assert_eq!(hit(s.get(&d).unwrap()), b"published");
    assert!(fs::symlink_metadata(&shard).unwrap().is_dir());
    assert_eq!(
        fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing written through the link"
    );
    assert_eq!(s.quarantined().len(), 1);
}

#[test]
fn maintenance_never_follows_a_symlinked_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = digest(41);
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let victim = elsewhere.join(d.hex());
    fs::write(&victim, b"not isocache's").unwrap();
    let shard = s.object_path(&d).parent().unwrap().to_owned();
    symlink(&elsewhere, &shard).unwrap();
    assert!(s.list().unwrap().is_empty());
    assert!(!s.remove(&d).unwrap());
    let r = s.verify(false).unwrap();
    assert_eq!((r.checked, r.bad.len()), (1, 1));
    assert!(r.bad[0].corruption.reason.contains("symbolic link"));
    assert_eq!(r.bad[0].corruption.kind, CorruptionKind::Symlink);
    s.verify(true).unwrap();
    assert!(victim.exists() && fs::symlink_metadata(&shard).is_err());
    symlink(&elsewhere, &shard).unwrap();
    s.gc(0).unwrap();
    assert_eq!(s.clear().unwrap(), 0);
    assert!(victim.exists(), "clear never reaches through the link");
    assert!(
        fs::symlink_metadata(&shard).is_err(),
        "the link itself is gone"
    );
    assert_eq!(fs::read(&victim).unwrap(), b"not isocache's");
}

#[test]
fn clear_removes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    s.put(&digest(50), b"a", 0.0).unwrap();
    s.put(&digest(51), b"b", 0.0).unwrap();
    assert_eq!(s.clear().unwrap(), 2);
    assert!(s.list().unwrap().is_empty());
    assert_eq!(
        Store::namespaces(&tmp.path().join("cache")).unwrap(),
        vec!["ns"]
    );
}

#[test]
fn namespaces_are_read_only_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cache");
    assert!(Store::namespaces(&root).unwrap().is_empty());
    assert!(!root.exists());
    Store::open(&root, "b", None).unwrap();
    Store::open(&root, "a", None).unwrap();
    fs::write(root.join("v1/not-a-dir"), b"").unwrap();
    assert_eq!(Store::namespaces(&root).unwrap(), vec!["a", "b"]);
    fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(
        Store::namespaces(&root),
        Err(Error::InsecureStore { .. })
    ));
}

#[test]
fn leases_live_in_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = digest(42);
    let l = s.lease(&d, Duration::ZERO).unwrap().unwrap();
    assert!(s.lease_held(&d));
    assert!(s.lease(&d, Duration::ZERO).unwrap().is_none());
    drop(l);
    assert!(!s.lease_held(&d));
    assert_eq!(s.clean_leases(), 1);
}

#[test]
fn concurrent_writers_and_readers_never_see_partial_files() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Arc::new(store(tmp.path()));
    let d = digest(10);
    let payloads: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 100_000 + i as usize]).collect();
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let s = s.clone();
            let p = payloads[i].clone();
            thread::spawn(move || {
                for _ in 0..20 {
                    s.put(&d, &p, 0.0).unwrap();
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            let payloads = payloads.clone();
            thread::spawn(move || {
                for _ in 0..200 {
                    match s.get(&d).unwrap() {
                        Lookup::Hit { payload, .. } => assert!(payloads.contains(&payload)),
                        Lookup::Miss => {}
                        l => panic!("reader saw {l:?}"),
                    }
                }
            })
        })
        .collect();
    for h in writers.into_iter().chain(readers) {
        h.join().unwrap();
    }
    assert_eq!(fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
}

// ---- the running size, eviction across namespaces, kinds ----

/// The record and a full scan agree.
fn assert_exact(s: &Store) -> RootSize {
    let root = s.root_handle();
    let recorded = root.size().unwrap();
    let scanned = root.scan().unwrap();
    assert_eq!(
        (recorded.bytes, recorded.artifacts),
        (scanned.bytes, scanned.artifacts),
        "the running size drifted from a scan"
    );
    recorded
}

fn size_record(s: &Store) -> PathBuf {
    s.root().join("v1").join(size::SIZE)
}

#[test]
fn the_running_size_follows_every_change() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    assert!(!size_record(&s).exists(), "opening writes no record");
    let per = |n: usize| HEADER_LEN as u64 + n as u64;
    s.put(&digest(1), &[1; 100], 0.0).unwrap();
    s.put(&digest(2), &[2; 200], 0.0).unwrap();
    assert!(size_record(&s).exists());
    assert_eq!(assert_exact(&s).bytes, per(100) + per(200));
    // Overwrite with another size.
    s.put(&digest(1), &[1; 50], 0.0).unwrap();
    assert_eq!(assert_exact(&s).bytes, per(50) + per(200));
    // A bad file moves to quarantine: still counted, no longer an artifact.
    let p = s.object_path(&digest(2));
    let mut b = fs::read(&p).unwrap();
    b[HEADER_LEN] ^= 1;
    fs::write(&p, b).unwrap();
    assert!(matches!(s.get(&digest(2)).unwrap(), Lookup::Corrupt { .. }));
    let now = assert_exact(&s);
    assert_eq!((now.bytes, now.artifacts), (per(50) + per(200), 1));
    for q in s.quarantined() {
        assert!(s.remove_quarantined(&q.name).unwrap());
    }
    assert_eq!(assert_exact(&s).bytes, per(50));
    assert!(s.remove(&digest(1)).unwrap());
    let now = assert_exact(&s);
    assert_eq!((now.bytes, now.artifacts), (0, 0));
    // Another namespace of the same root shares the record.
    let other = Store::open(s.root(), "other", None).unwrap();
    other.put(&digest(3), &[3; 10], 0.0).unwrap();
    assert_eq!(assert_exact(&s).bytes, per(10));
    s.put(&digest(4), &[4; 10], 0.0).unwrap();
    assert_eq!(other.root_size().unwrap().bytes, 2 * per(10));
    assert_eq!(s.clear().unwrap(), 1);
    assert_eq!(assert_exact(&other).bytes, per(10));
}

#[test]
fn concurrent_puts_keep_the_running_size_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cache");
    let shared = Arc::new(Store::open(&root, "ns", None).unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            // Half the threads share one handle, half open their own (as
            // other processes would: another open file, another lock).
            let own = (t % 2 == 1).then(|| Store::open(&root, "ns", None).unwrap());
            let shared = shared.clone();
            thread::spawn(move || {
                let s = own.as_ref().unwrap_or(&shared);
                for i in 0..40u8 {
                    // Overlapping digests: overwrites race with new files.
                    let d = digest(i % 24);
                    s.put(&d, &vec![t; 100 + t as usize * 10 + i as usize], 0.0)
                        .unwrap();
                    if i % 7 == 0 {
                        s.remove(&digest((i + t) % 24)).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in threads {
        h.join().unwrap();
    }
    let now = assert_exact(&shared);
    assert!(now.artifacts > 0 && now.artifacts <= 24);
}

#[test]
fn drift_is_repaired_by_a_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    for n in 0..4 {
        s.put(&digest(n), &[n; 1000], 0.0).unwrap();
    }
    let per = HEADER_LEN as u64 + 1000;
    // A file removed behind the store's back: the record is stale...
    fs::remove_file(s.object_path(&digest(0))).unwrap();
    assert_eq!(s.root_size().unwrap().bytes, 4 * per);
    // ...until a full scan: gc, verify or clear rebuild it.
    s.gc(u64::MAX).unwrap();
    assert_eq!(assert_exact(&s).bytes, 3 * per);
    fs::remove_file(s.object_path(&digest(1))).unwrap();
    s.verify(false).unwrap();
    assert_eq!(assert_exact(&s).bytes, 2 * per);
    // A missing record is rebuilt by the next change.
    fs::remove_file(size_record(&s)).unwrap();
    assert_eq!(s.root_size().unwrap().bytes, 2 * per, "read by a scan");
    assert!(!size_record(&s).exists(), "reading writes nothing");
    s.put(&digest(9), &[9; 1000], 0.0).unwrap();
    assert_eq!(assert_exact(&s).bytes, 3 * per);
    // So is a damaged one, and one whose last scan is too old.
    fs::write(size_record(&s), b"garbage").unwrap();
    fs::remove_file(s.object_path(&digest(9))).unwrap();
    s.put(&digest(8), &[8; 1000], 0.0).unwrap();
    assert_eq!(assert_exact(&s).bytes, 3 * per);
    let stale = RootSize {
        bytes: 1,
        artifacts: 1,
        scanned_at: size::now_secs() - size::RESCAN_AFTER.as_secs() - 10,
    };
    fs::write(size_record(&s), stale.encode()).unwrap();
    assert_eq!(s.root_size().unwrap().bytes, 1, "a reader trusts it");
    s.remove(&digest(8)).unwrap();
    assert_eq!(assert_exact(&s).bytes, 2 * per, "a writer rescans it");
}

#[test]
fn a_put_over_the_cap_evicts_least_recently_used_across_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cache");
    let a = Store::open(&root, "a", None).unwrap();
    let b = Store::open(&root, "b", None).unwrap();
    let per = HEADER_LEN as u64 + 1000;
    for n in 0..5u8 {
        let s = if n % 2 == 0 { &a } else { &b };
        s.put(&digest(n), &[n; 1000], 0.0).unwrap();
        set_mtime(&s.object_path(&digest(n)), 1_000_000 + n as u64);
    }
    // Under the cap: nothing to do, no report.
    assert!(a
        .publish(
            &digest(5),
            &[5; 1000],
            0.0,
            ArtifactKind::Piece,
            Some(6 * per)
        )
        .unwrap()
        .is_none());
    // Over it: down to 90% of the cap, the oldest first, whatever the namespace.
    let r = b
        .publish(
            &digest(6),
            &[6; 1000],
            0.0,
            ArtifactKind::Model,
            Some(6 * per),
        )
        .unwrap()
        .expect("evicted");
    assert_eq!(r.removed, 2);
    let gone: Vec<(String, Digest)> = r
        .evicted
        .iter()
        .map(|o| (o.namespace.clone(), o.digest))
        .collect();
    assert_eq!(
        gone,
        vec![("a".to_string(), digest(0)), ("b".to_string(), digest(1))]
    );
    assert_eq!(r.remaining_bytes, 5 * per);
    assert!(r.remaining_bytes <= 6 * per * EVICT_TO_PERCENT / 100);
    assert!(b.contains(&digest(6)), "the new artifact stays");
    assert_eq!(assert_exact(&a).bytes, 5 * per);
}

#[test]
fn root_gc_takes_the_quarantine_first_then_one_lru_order() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cache");
    let a = Store::open(&path, "a", None).unwrap();
    let b = Store::open(&path, "b", None).unwrap();
    let per = HEADER_LEN as u64 + 1000;
    a.put(&digest(1), &[1; 1000], 0.0).unwrap();
    b.put(&digest(2), &[2; 1000], 0.0).unwrap();
    a.put(&digest(3), &[3; 1000], 0.0).unwrap();
    for (s, n, t) in [(&a, 1, 30), (&b, 2, 10), (&a, 3, 20)] {
        set_mtime(&s.object_path(&digest(n)), 1_000_000 + t);
    }
    b.put(&digest(4), &[4; 1000], 0.0).unwrap();
    let p = b.object_path(&digest(4));
    fs::write(&p, b"rotten").unwrap();
    assert!(matches!(b.get(&digest(4)).unwrap(), Lookup::Corrupt { .. }));
    let root = Arc::new(Root::open_existing_writable(&path).unwrap().unwrap());
    let r = root.gc(2 * per).unwrap();
    assert_eq!((r.quarantine_removed, r.removed), (1, 1));
    assert_eq!(
        r.evicted[0].digest,
        digest(2),
        "the least recently used, in b"
    );
    assert_eq!((r.remaining, r.remaining_bytes), (2, 2 * per));
    assert_eq!(assert_exact(&a).artifacts, 2);
    let ro = Arc::new(Root::open(&path, false).unwrap().unwrap());
    assert!(matches!(ro.gc(0), Err(Error::ReadOnly { .. })));
    assert!(Root::open_existing_writable(&tmp.path().join("none"))
        .unwrap()
        .is_none());
}

#[test]
fn a_root_by_path_is_collected_and_sized_and_a_missing_one_is_left_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let none = tmp.path().join("none");
    let empty = Root::gc_path(&none, 0).unwrap();
    assert_eq!(
        (empty.removed, empty.remaining, empty.freed_bytes),
        (0, 0, 0)
    );
    assert_eq!(Root::size_of_path(&none).unwrap().bytes, 0);
    assert!(!none.exists(), "neither creates the root");
    let path = tmp.path().join("cache");
    let s = Store::open(&path, "ns", None).unwrap();
    s.put(&digest(1), &[1; 100], 0.0).unwrap();
    s.put(&digest(2), &[2; 100], 0.0).unwrap();
    let per = HEADER_LEN as u64 + 100;
    let size = Root::size_of_path(&path).unwrap();
    assert_eq!((size.artifacts, size.bytes), (2, 2 * per));
    let r = Root::gc_path(&path, per).unwrap();
    assert_eq!((r.removed, r.remaining), (1, 1));
    assert_eq!(Root::size_of_path(&path).unwrap().artifacts, 1);
}

#[test]
fn model_entries_are_a_kind_the_store_knows() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    s.publish(&digest(1), b"model", 2.0, ArtifactKind::Model, None)
        .unwrap();
    s.put(&digest(2), b"piece", 1.0).unwrap();
    match s.get(&digest(1)).unwrap() {
        Lookup::Hit { kind, .. } => assert_eq!(kind, ArtifactKind::Model),
        other => panic!("{other:?}"),
    }
    let kinds: Vec<_> = s
        .list()
        .unwrap()
        .iter()
        .map(|o| (o.digest, o.kind))
        .collect();
    let mut expected = vec![
        (digest(1), ArtifactKind::Model),
        (digest(2), ArtifactKind::Piece),
    ];
    expected.sort_by_key(|(d, _)| d.0);
    assert_eq!(kinds, expected);
    let r = s.verify(false).unwrap();
    assert_eq!((r.checked, r.pieces, r.models), (2, 1, 1));
    // A file written before kinds existed (flags 0) reads as a piece.
    let old = file_image(&digest(3), b"old", 0.0, None, ArtifactKind::Piece);
    assert_eq!(&old[10..12], &[0, 0]);
    let p = s.object_path(&digest(3));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, old).unwrap();
    match s.get(&digest(3)).unwrap() {
        Lookup::Hit { kind, .. } => assert_eq!(kind, ArtifactKind::Piece),
        other => panic!("{other:?}"),
    }
}

#[test]
fn corruption_kinds_are_typed() {
    let kind_of = |l: Lookup| match l {
        Lookup::Corrupt { corruption, .. } => corruption.kind,
        other => panic!("{other:?}"),
    };
    let (l, _s, _t) = corrupt_with(|b| {
        let n = b.len() - 1;
        b[n] ^= 1
    });
    assert_eq!(kind_of(l), CorruptionKind::Checksum);
    let (l, _s, _t) = corrupt_with(|b| b.truncate(b.len() - 3));
    assert_eq!(kind_of(l), CorruptionKind::Length);
    let (l, _s, _t) = corrupt_with(|b| b.truncate(20));
    assert_eq!(kind_of(l), CorruptionKind::Truncated);
    let (l, _s, _t) = corrupt_with(|b| b[0] = b'X');
    assert_eq!(kind_of(l), CorruptionKind::Magic);
    let (l, _s, _t) = corrupt_with(|b| b[8] = 9);
    assert_eq!(kind_of(l), CorruptionKind::Version);
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let d = digest(7);
    let target = s.object_path(&d);
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    symlink(tmp.path().join("elsewhere"), &target).unwrap();
    assert_eq!(kind_of(s.get(&d).unwrap()), CorruptionKind::Symlink);
    fs::create_dir_all(&target).unwrap();
    assert_eq!(kind_of(s.get(&d).unwrap()), CorruptionKind::NotRegular);
    s.put(&d, b"x", 0.0).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(kind_of(s.get(&d).unwrap()), CorruptionKind::NotPrivate);
    assert_eq!(s.refused(), 3);
}

#[test]
fn a_held_size_lock_costs_a_short_wait_once_and_a_recount_later() {
    use rustix::fs::{flock, FlockOperation};
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let per = HEADER_LEN as u64 + 100;
    s.put(&digest(1), &[1; 100], 0.0).unwrap();
    assert_eq!(s.size_lock_skips(), 0);
    // Another open file description holds the lock, as a stopped process would.
    let holder = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(size_record(&s))
        .unwrap();
    flock(&holder, FlockOperation::LockExclusive).unwrap();
    let start = Instant::now();
    s.put(&digest(2), &[2; 100], 0.0).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(hit(s.get(&digest(2)).unwrap()), vec![2; 100], "stored");
    assert_eq!(s.size_lock_skips(), 1);
    // Later changes only try once; the cap is not enforced meanwhile.
    s.publish(&digest(3), &[3; 100], 0.0, ArtifactKind::Piece, Some(1))
        .unwrap();
    assert!(s.remove(&digest(1)).unwrap());
    assert_eq!(s.size_lock_skips(), 3);
    assert!(s.root().join("v1").join(size::STALE).exists());
    // The record misses those changes; readers scan instead of trusting it.
    let stale = RootSize::decode_for_tests(&fs::read(size_record(&s)).unwrap());
    assert_eq!(stale.map(|r| r.artifacts), Some(1));
    assert_eq!(s.root_size().unwrap().bytes, 2 * per);
    // Once the lock is free, the next taker (another handle here, as another
    // process would be) recounts.
    drop(holder);
    let other = Store::open(s.root(), "other", None).unwrap();
    other.put(&digest(4), &[4; 100], 0.0).unwrap();
    assert!(!s.root().join("v1").join(size::STALE).exists());
    let now = assert_exact(&s);
    assert_eq!((now.bytes, now.artifacts), (3 * per, 3));
    s.put(&digest(5), &[5; 100], 0.0).unwrap();
    assert_eq!(s.size_lock_skips(), 3, "the lock is free again");
    assert_eq!(assert_exact(&s).artifacts, 4);
}
