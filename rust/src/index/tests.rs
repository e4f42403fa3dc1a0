//! Unit and property tests of the index against a deliberately naive reference of the repair
//! strategy (the same strategy `tests/test_index.py` re-implements in Python).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;

/// Naive repair: returns the final SID of every input row and whether a level was appended.
fn reference_repair(ids: &[u64], codes: &[u16], levels: usize, sizes: &[u32]) -> (Vec<Vec<u16>>, bool) {
    let n = ids.len();
    let mut order: Vec<usize> = (0..n).collect();
    let sid = |r: usize| codes[r * levels..(r + 1) * levels].to_vec();
    order.sort_by_key(|&r| (sid(r), ids[r]));
    let mut out: Vec<Vec<u16>> = (0..n).map(sid).collect();
    let mut by_prefix: BTreeMap<Vec<u16>, Vec<usize>> = BTreeMap::new();
    for &r in &order {
        by_prefix.entry(out[r][..levels - 1].to_vec()).or_default().push(r);
    }
    let last_size = sizes[levels - 1];
    let mut stuck = false;
    for rows in by_prefix.values() {
        let mut taken: BTreeSet<u16> = rows.iter().map(|&r| out[r][levels - 1]).collect();
        let movers: Vec<usize> = rows.windows(2).filter(|w| sid(w[0]) == sid(w[1])).map(|w| w[1]).collect();
        for r in movers {
            let code = out[r][levels - 1];
            let target = (0..last_size as u16).filter(|c| !taken.contains(c)).min_by_key(|&c| (c.abs_diff(code), c));
            match target {
                Some(c) => {
                    taken.insert(c);
                    out[r][levels - 1] = c;
                }
                None => stuck = true,
            }
        }
    }
    if stuck {
        let mut seen: HashMap<Vec<u16>, u16> = HashMap::new();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&r| (out[r].clone(), ids[r]));
        for r in order {
            let rank = seen.entry(out[r].clone()).or_insert(0);
            let code = *rank;
            *rank += 1;
            out[r].push(code);
        }
    }
    (out, stuck)
}

/// `n` distinct ids below `range` from a xorshift stream seeded with `seed`, ascending.
pub(super) fn xorshift_ids(n: usize, seed: u64, range: u64) -> Vec<u64> {
    let mut set = BTreeSet::new();
    let mut x = seed | 1;
    while set.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        set.insert(x % range);
    }
    set.into_iter().collect()
}

/// Random unique ids (sparse or dense) and codes with small level sizes, so collisions and full
/// prefixes are common.
fn dataset() -> impl Strategy<Value = (Vec<u64>, Vec<u16>, usize, Vec<u32>)> {
    (0usize..120, 1usize..4, proptest::collection::vec(1u32..6, 3), any::<bool>(), any::<u64>()).prop_flat_map(
        |(n, levels, sizes, dense, seed)| {
            let sizes = sizes[..levels].to_vec();
            let code_strategies: Vec<_> = (0..n)
                .flat_map(|_| sizes.iter().map(|&s| 0..s as u16).collect::<Vec<_>>())
                .collect();
            let ids: Vec<u64> = if dense {
                (0..n as u64).map(|i| i + seed % 1000).collect()
            } else {
                let mut v = xorshift_ids(n, seed, 5000);
                v.reverse();
                v
            };
            (Just(ids), code_strategies, Just(levels), Just(sizes))
        },
    )
}

fn check_index(index: &SidIndex, ids: &[u64], codes: &[u16], levels: usize, sizes: &[u32]) {
    let n = ids.len();
    let (want, appended) = reference_repair(ids, codes, levels, sizes);
    let out_levels = levels + usize::from(appended);
    assert_eq!(index.len(), n);
    assert_eq!(index.levels(), out_levels);
    assert_eq!(index.repair_report().level_appended, appended);
    assert_eq!(&index.level_sizes()[..levels], sizes);

    // The SIDs are the reference's, and unique.
    let got = index.sids(ids).unwrap();
    for r in 0..n {
        assert_eq!(&got[r * out_levels..(r + 1) * out_levels], want[r].as_slice(), "row {r}");
    }
    let distinct: BTreeSet<&[u16]> = got.chunks(out_levels.max(1)).collect();
    assert_eq!(distinct.len(), n);

    // Items whose SID nobody shared keep it.
    let mut count: HashMap<&[u16], usize> = HashMap::new();
    for row in codes.chunks(levels) {
        *count.entry(row).or_default() += 1;
    }
    let mut unique = 0;
    for r in 0..n {
        let original = &codes[r * levels..(r + 1) * levels];
        if count[original] == 1 {
            unique += 1;
            assert_eq!(&got[r * out_levels..r * out_levels + levels], original);
            if appended {
                assert_eq!(got[r * out_levels + levels], 0);
            }
        }
    }
    let report = index.repair_report();
    assert_eq!(report.unique_items_before, unique);
    assert_eq!(report.distinct_sids_before, count.len() as u64);
    let grouped: u64 = report.collision_group_sizes.iter().map(|&(s, c)| s * c).sum();
    assert_eq!(grouped + unique, n as u64);

    // Lookups are inverse to each other.
    assert_eq!(index.items(&got).unwrap(), ids);

    // Sorted view: ascending SIDs, consistent with lookups and with children().
    let all_codes = index.codes_by_sid();
    let all_items = index.item_ids_by_sid();
    let rows: Vec<&[u16]> = all_codes.chunks(out_levels).collect();
    assert!(rows.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(index.sids(&all_items).unwrap(), all_codes);
    for (p, row) in rows.iter().enumerate() {
        assert_eq!(index.position_of_sid(row), Some(p));
        assert_eq!(index.position_of_item(all_items[p]), Some(p));
        assert_eq!(index.item_at(p), all_items[p]);
        for depth in 0..=out_levels {
            let range = index.prefix_range(&row[..depth]).unwrap();
            let expected: Vec<usize> = (0..n).filter(|&q| rows[q][..depth] == row[..depth]).collect();
            assert_eq!(range, expected[0]..expected[expected.len() - 1] + 1);
            let children = index.children(&row[..depth]).unwrap();
            if depth == out_levels {
                assert!(children.is_empty());
                continue;
            }
            let codes_below: BTreeSet<u16> = expected.iter().map(|&q| rows[q][depth]).collect();
            assert_eq!(children.iter().map(|c| c.code).collect::<Vec<_>>(), codes_below.into_iter().collect::<Vec<_>>());
            for child in &children {
                assert!(child.items.clone().all(|q| rows[q][depth] == child.code));
            }
            assert_eq!(children.first().unwrap().items.start, range.start);
            assert_eq!(children.last().unwrap().items.end, range.end);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases(200)))]

    #[test]
    fn build_matches_reference((ids, codes, levels, sizes) in dataset()) {
        let index = SidIndex::build(&ids, &codes, levels, Some(&sizes)).unwrap();
        check_index(&index, &ids, &codes, levels, &sizes);
    }

    #[test]
    fn save_load_round_trip((ids, codes, levels, sizes) in dataset()) {
        let index = SidIndex::build(&ids, &codes, levels, Some(&sizes)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.gr2sid");
        index.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        prop_assert_eq!(&index.to_bytes().unwrap(), &bytes);
        for loaded in [
            SidIndex::load(&path).unwrap(),
            SidIndex::load_with(&path, LoadMode::Mmap).unwrap(),
            SidIndex::from_bytes(&bytes).unwrap(),
            SidIndex::load_verified(&path, LoadMode::Copy, false).unwrap(),
            SidIndex::load_verified(&path, LoadMode::Mmap, false).unwrap(),
        ] {
            prop_assert_eq!(loaded.repair_report(), index.repair_report());
            prop_assert_eq!(loaded.level_sizes(), index.level_sizes());
            check_index(&loaded, &ids, &codes, levels, &sizes);
        }
    }

    #[test]
    fn corruption_is_detected(
        (ids, codes, levels, sizes) in dataset(),
        where_: proptest::sample::Index,
        flip in 1u8..=255,
        cut: proptest::sample::Index,
    ) {
        let index = SidIndex::build(&ids, &codes, levels, Some(&sizes)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.gr2sid");
        index.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();

        let mut garbled = bytes.clone();
        garbled[where_.index(bytes.len())] ^= flip;
        std::fs::write(&path, &garbled).unwrap();
        prop_assert!(matches!(SidIndex::load(&path), Err(Gr2Error::CorruptFile(_))));
        prop_assert!(matches!(SidIndex::load_with(&path, LoadMode::Mmap), Err(Gr2Error::CorruptFile(_))));
        prop_assert!(matches!(SidIndex::from_bytes(&garbled), Err(Gr2Error::CorruptFile(_))));
        // Unverified, a flip in the arrays goes unseen (that is the point); one in the header or
        // the section table is still a CorruptFile error. (A query on such an index may panic: the
        // bindings turn that into InternalError, tests/test_index.py.)
        for mode in [LoadMode::Copy, LoadMode::Mmap] {
            let loaded = SidIndex::load_verified(&path, mode, false);
            prop_assert!(loaded.is_ok() || matches!(loaded, Err(Gr2Error::CorruptFile(_))));
        }

        let truncated = &bytes[..cut.index(bytes.len())];
        std::fs::write(&path, truncated).unwrap();
        prop_assert!(matches!(SidIndex::load(&path), Err(Gr2Error::CorruptFile(_))));

        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        prop_assert!(matches!(SidIndex::load(&path), Err(Gr2Error::CorruptFile(_))));
    }
}

fn message(err: Gr2Error) -> String {
    err.to_string()
}

#[test]
fn full_prefix_appends_a_level() {
    // Three items on the same SID, last level of size 2: one moves to the free code, then the
    // prefix is full and the third needs the disambiguation level.
    let ids = [30u64, 10, 20];
    let codes = [1u16, 0, 1, 0, 1, 0];
    let index = SidIndex::build(&ids, &codes, 2, Some(&[2, 2])).unwrap();
    assert_eq!(index.levels(), 3);
    assert_eq!(index.level_sizes(), &[2, 2, 2]);
    assert_eq!(index.sids(&[10, 20, 30]).unwrap(), vec![1, 0, 0, 1, 1, 0, 1, 0, 1]);
    let report = index.repair_report();
    assert_eq!((report.items_moved, report.full_prefixes, report.items_disambiguated), (1, 1, 1));
    assert_eq!(report.collision_group_sizes, vec![(3, 1)]);
    assert_eq!(report.uniqueness_before_repair(), 0.0);
}

#[test]
fn moves_to_nearest_free_code_ties_low() {
    // Codes 5 (x2) in a level of 10 with 4 and 6 free: tie -> 4.
    let index = SidIndex::build(&[1, 2, 3], &[5, 5, 0], 1, Some(&[10])).unwrap();
    assert_eq!(index.sids(&[1, 2, 3]).unwrap(), vec![5, 4, 0]);
    assert_eq!(index.repair_report().max_move_distance, 1);
}

#[test]
fn default_level_size() {
    let index = SidIndex::build(&[1, 2], &[3, 4, 5, 6], 2, None).unwrap();
    assert_eq!(index.level_sizes(), &[256, 256]);
    let index = SidIndex::build(&[1, 2], &[3, 4, 5, 600], 2, None).unwrap();
    assert_eq!(index.level_sizes(), &[601, 601]);
}

#[test]
fn input_errors_name_the_problem() {
    let err = message(SidIndex::build(&[4, 7, 4], &[0, 1, 2], 1, None).unwrap_err());
    assert!(err.contains("item id 4") && err.contains("rows 0 and 2"), "{err}");
    let err = message(SidIndex::build(&[1, 2], &[0, 1, 2, 9], 2, Some(&[8, 8])).unwrap_err());
    assert!(err.contains("codes[1, 1] = 9"), "{err}");
    assert!(SidIndex::build(&[1, 2], &[0, 1, 2], 2, None).is_err());
    assert!(SidIndex::build(&[1], &[0], 1, Some(&[8, 8])).is_err());
    assert!(SidIndex::build(&[1], &[0], 1, Some(&[0])).is_err());
    assert!(SidIndex::build(&[], &[], 0, None).is_err());
    // Degenerate codes: more items on one SID than a disambiguation level can number.
    let n = 70_000u64;
    let ids: Vec<u64> = (0..n).collect();
    let err = message(SidIndex::build(&ids, &vec![0u16; n as usize], 1, Some(&[2])).unwrap_err());
    assert!(err.contains("too degenerate"), "{err}");
}

#[test]
fn lookup_errors_name_first_offender() {
    let ids: Vec<u64> = (0..10_000).map(|i| i * 3).collect();
    let codes: Vec<u16> = (0..10_000u32).flat_map(|i| [(i % 97) as u16, (i / 97) as u16]).collect();
    let index = SidIndex::build(&ids, &codes, 2, Some(&[97, 200])).unwrap();
    let mut queries = ids.clone();
    queries[9000] = 1;
    queries[5000] = 2;
    let Err(Gr2Error::UnknownItem(err)) = index.sids(&queries) else { panic!("expected UnknownItem") };
    assert!(err.contains("item id 2 (row 5000)"), "{err}");

    let mut sids = index.sids(&ids).unwrap();
    sids[2 * 7000 + 1] = 150; // i = 7000: (16, 72) -> (16, 150), not an item
    sids[2 * 6000] = 99; // code out of range on level 0
    let Err(Gr2Error::UnknownSid(err)) = index.items(&sids) else { panic!("expected UnknownSid") };
    assert!(err.contains("(row 6000)") && err.contains("level-0 code 99"), "{err}");
    sids[2 * 6000] = 0;
    let Err(Gr2Error::UnknownSid(err)) = index.items(&sids) else { panic!("expected UnknownSid") };
    assert!(err.contains("(row 7000)") && err.contains("maps to no item"), "{err}");
    assert!(index.items(&sids[..3]).is_err());
    assert!(index.children(&[0, 0, 0]).is_err());
    assert!(index.children(&[97]).is_err());
    assert!(index.children(&[0, 199]).unwrap().is_empty());
}

#[test]
fn empty_and_single() {
    let empty = SidIndex::build(&[], &[], 3, Some(&[4, 4, 4])).unwrap();
    assert_eq!(empty.len(), 0);
    assert_eq!(empty.uniqueness_before_repair(), 1.0);
    assert!(empty.sids(&[]).unwrap().is_empty());
    assert!(matches!(empty.sids(&[0]), Err(Gr2Error::UnknownItem(_))));
    assert!(matches!(empty.items(&[0, 0, 0]), Err(Gr2Error::UnknownSid(_))));
    assert!(empty.children(&[]).unwrap().is_empty());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.gr2sid");
    empty.save(&path).unwrap();
    assert_eq!(SidIndex::load(&path).unwrap().levels(), 3);

    let one = SidIndex::build(&[u64::MAX], &[3, 2, 1], 3, Some(&[4, 4, 4])).unwrap();
    assert_eq!(one.sids(&[u64::MAX]).unwrap(), vec![3, 2, 1]);
    assert_eq!(one.items(&[3, 2, 1]).unwrap(), vec![u64::MAX]);
    assert!(one.contains(u64::MAX) && !one.contains(0));
}

#[test]
fn large_batches_cross_chunks() {
    // Enough rows for several parallel lookup chunks, ids sparse (bucket table) and dense.
    let n = 50_000usize;
    for stride in [1u64, 7919] {
        let ids: Vec<u64> = (0..n as u64).map(|i| 1000 + i * stride).collect();
        let codes: Vec<u16> =
            (0..n).flat_map(|i| [(i * 31 % 256) as u16, (i * 17 % 256) as u16, (i % 13) as u16]).collect();
        let index = SidIndex::build(&ids, &codes, 3, None).unwrap();
        let mut queries = ids.clone();
        queries.reverse();
        let sids = index.sids(&queries).unwrap();
        assert_eq!(index.items(&sids).unwrap(), queries);
        assert_eq!(index.memory_bytes() / n, 20, "3 levels of <= 256 codes pack into 4-byte keys");
    }
}

#[test]
fn wide_and_narrow_keys_round_trip() {
    // 4 x 256 codes = 32 bits (narrow, 4-byte keys); 5 x 256 = 40 bits (wide, 8-byte keys).
    let n = 20_000usize;
    let ids: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    for (levels, bytes_per_item) in [(4usize, 20usize), (5, 24)] {
        let codes: Vec<u16> = (0..n * levels).map(|i| ((i * 2_654_435_761) >> 7) as u16 % 256).collect();
        let index = SidIndex::build(&ids, &codes, levels, Some(&vec![256; levels])).unwrap();
        assert_eq!(index.memory_bytes() / n, bytes_per_item, "{levels} levels");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.gr2sid");
        index.save(&path).unwrap();
        let loaded = SidIndex::load(&path).unwrap();
        let sids = index.sids(&ids).unwrap();
        assert_eq!(loaded.sids(&ids).unwrap(), sids);
        assert_eq!(loaded.items(&sids).unwrap(), ids);
        assert_eq!(loaded.codes_by_sid(), index.codes_by_sid());
        let prefix = &sids[..2];
        assert_eq!(loaded.children(prefix).unwrap(), index.children(prefix).unwrap());
        assert!(!index.children(&sids[..1]).unwrap().is_empty());
    }
}

#[test]
fn io_errors_name_the_path() {
    let err = SidIndex::load("/nonexistent/dir/index.gr2sid").unwrap_err();
    assert!(matches!(err, Gr2Error::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/dir/index.gr2sid"));
    let index = SidIndex::build(&[1], &[1], 1, None).unwrap();
    let err = index.save("/nonexistent/dir/index.gr2sid").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/dir/index.gr2sid"), "{err}");
}

#[test]
fn wrong_magic_and_version() {
    let index = SidIndex::build(&[1, 2], &[1, 2], 1, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i.gr2sid");
    index.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut bad = bytes.clone();
    bad[0] = b'X';
    std::fs::write(&path, &bad).unwrap();
    assert!(message(SidIndex::load(&path).unwrap_err()).contains("not a gr2 SID index"));
    let mut bad = bytes.clone();
    bad[8] = 7;
    std::fs::write(&path, &bad).unwrap();
    assert!(message(SidIndex::load(&path).unwrap_err()).contains("format version 7"));
    std::fs::write(&path, &bytes[..100]).unwrap();
    assert!(message(SidIndex::load(&path).unwrap_err()).contains("truncated"));
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    assert!(message(SidIndex::load(&path).unwrap_err()).contains("truncated"));
    std::fs::write(&path, b"").unwrap();
    assert!(message(SidIndex::load(&path).unwrap_err()).contains("empty"));
}

#[test]
fn copied_in_index_ignores_later_writes_to_the_file() {
    let ids: Vec<u64> = (0..1000).collect();
    let a: Vec<u16> = (0..1000u16).flat_map(|i| [i / 256, i % 256]).collect();
    let b: Vec<u16> = (0..1000u16).flat_map(|i| [(999 - i) / 256, (999 - i) % 256]).collect();
    let (ia, ib) = (SidIndex::build(&ids, &a, 2, None).unwrap(), SidIndex::build(&ids, &b, 2, None).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i.gr2sid");
    ia.save(&path).unwrap();
    let loaded = SidIndex::load(&path).unwrap();
    let mapped = SidIndex::load_with(&path, LoadMode::Mmap).unwrap();
    assert!(!loaded.is_mapped() && mapped.is_mapped() && !ia.is_mapped());
    // Replaced by rename (save): both keep the old contents.
    ib.save(&path).unwrap();
    assert_eq!(loaded.sids(&ids).unwrap(), a);
    assert_eq!(mapped.sids(&ids).unwrap(), a);
    // Rewritten in place and then truncated: the copied-in index does not notice.
    let loaded = SidIndex::load(&path).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    assert_eq!(loaded.sids(&ids).unwrap(), b);
    assert_eq!(loaded.items(&b).unwrap(), ids);
}

#[test]
fn level_limit_is_the_same_for_build_and_load() {
    let ids = [1u64, 2];
    let err = SidIndex::build(&ids, &[0; 128], 64, Some(&[1; 64])).unwrap_err();
    assert!(matches!(err, Gr2Error::InvalidInput(_)) && err.to_string().contains("at most 64 levels"), "{err}");
    let err = SidIndex::build(&ids, &[0; 130], 65, Some(&[1; 65])).unwrap_err();
    assert!(err.to_string().contains("at most 64 levels"), "{err}");
    // 63 levels + the disambiguation level = 64: saved and read back.
    let index = SidIndex::build(&ids, &[0; 126], 63, Some(&[1; 63])).unwrap();
    assert_eq!(index.levels(), MAX_LEVELS);
    let back = SidIndex::from_bytes(&index.to_bytes().unwrap()).unwrap();
    assert_eq!(back.sids(&ids).unwrap(), index.sids(&ids).unwrap());
}

#[test]
fn directories_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [LoadMode::Copy, LoadMode::Mmap] {
        let err = SidIndex::load_with(dir.path(), mode).unwrap_err();
        assert!(matches!(err, Gr2Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("is a directory"), "{err}");
    }
    let index = SidIndex::build(&[1], &[1], 1, None).unwrap();
    assert!(index.save(dir.path()).unwrap_err().to_string().contains("is a directory"));
}

#[cfg(target_os = "linux")]
#[test]
fn save_removes_only_provably_stale_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i.gr2sid");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let dead = child.id();
    let names = [
        format!(".i.gr2sid.tmp-{dead}-1"),                       // stale: removed
        format!(".i.gr2sid.tmp-{}-2", std::process::id()),      // ours (maybe another thread)
        ".i.gr2sid.tmp-1-3".to_string(),                         // pid 1 is alive
        format!(".j.gr2sid.tmp-{dead}-4"),                       // another target
        format!(".i.gr2sid.tmp-{dead}-x"),                       // not our pattern
    ];
    for name in &names {
        std::fs::write(dir.path().join(name), b"partial").unwrap();
    }
    // A stale-looking file whose lock is held (a writer in another PID namespace) is kept.
    let locked_name = format!(".i.gr2sid.tmp-{dead}-5");
    let locked = std::fs::File::create(dir.path().join(&locked_name)).unwrap();
    assert!(file::try_lock(&locked));
    SidIndex::build(&[1, 2], &[1, 2], 1, None).unwrap().save(&path).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    let mut expected: Vec<String> = names[1..].iter().cloned().chain([locked_name, "i.gr2sid".into()]).collect();
    expected.sort();
    assert_eq!(left, expected);
}

#[path = "update_tests.rs"]
mod update_tests;
