//! Tests of `SidIndex::extend` / `SidIndex::remove` against a naive reference of the extension
//! rule (see the `update` module docs).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

/// Every (id, SID) of an index.
fn all_sids(index: &SidIndex) -> BTreeMap<u64, Vec<u16>> {
    let levels = index.levels();
    let ids = index.item_ids_by_sid();
    let codes = index.codes_by_sid();
    ids.into_iter().zip(codes.chunks(levels.max(1)).map(<[u16]>::to_vec)).collect()
}

/// Naive extension: the final SID of every new row, or the rows whose prefix ran out of codes
/// (only the first failing mover of each prefix is evaluated, as in the Rust code).
fn reference_extend(
    index: &SidIndex,
    ids: &[u64],
    codes: &[Vec<u16>],
) -> std::result::Result<Vec<Vec<u16>>, BTreeSet<usize>> {
    let report = index.repair_report();
    let (levels_in, appended) = (report.levels_in, report.level_appended);
    let sizes = index.level_sizes();
    let repair = levels_in - 1;
    let mut taken: BTreeSet<Vec<u16>> = all_sids(index).into_values().collect();
    let mut out: Vec<Vec<u16>> = codes
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.resize(index.levels(), 0);
            c
        })
        .collect();
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&r| (out[r].clone(), ids[r]));
    let mut movers = Vec::new();
    for &r in &order {
        if taken.insert(out[r].clone()) {
            continue;
        }
        movers.push(r);
    }
    let mut failed_prefixes = BTreeSet::new();
    let mut failures = BTreeSet::new();
    for r in movers {
        let prefix = out[r][..repair].to_vec();
        if failed_prefixes.contains(&prefix) {
            continue;
        }
        let own = out[r][repair];
        let code_taken = |c: u16, taken: &BTreeSet<Vec<u16>>| taken.iter().any(|s| s[..repair] == prefix[..] && s[repair] == c);
        let target = (0..sizes[repair]).map(|c| c as u16).filter(|&c| !code_taken(c, &taken)).min_by_key(|&c| (c.abs_diff(own), c));
        if let Some(c) = target {
            out[r][repair] = c;
            if appended {
                out[r][levels_in] = 0;
            }
            taken.insert(out[r].clone());
            continue;
        }
        let slot = appended
            .then(|| {
                let own = out[r][levels_in];
                (0..sizes[levels_in])
                    .map(|d| d as u16)
                    .filter(|&d| {
                        let mut s = out[r].clone();
                        s[levels_in] = d;
                        !taken.contains(&s)
                    })
                    .min_by_key(|&d| (d.abs_diff(own), d))
            })
            .flatten();
        match slot {
            Some(d) => {
                out[r][levels_in] = d;
                taken.insert(out[r].clone());
            }
            None => {
                failed_prefixes.insert(prefix);
                failures.insert(r);
            }
        }
    }
    if failures.is_empty() {
        Ok(out)
    } else {
        Err(failures)
    }
}

/// Checks an extended index: old SIDs unchanged, new SIDs as the reference says, all unique,
/// lookups consistent, and the file round trip keeps everything (load re-validates the arrays).
fn check_extended(before: &SidIndex, after: &SidIndex, ids: &[u64], want: &[Vec<u16>]) {
    let old = all_sids(before);
    let now = all_sids(after);
    assert_eq!(now.len(), old.len() + ids.len());
    assert_eq!(after.levels(), before.levels());
    assert_eq!(after.level_sizes(), before.level_sizes());
    assert_eq!(after.generation(), before.generation() + 1);
    for (id, sid) in &old {
        assert_eq!(&now[id], sid, "existing item {id} changed its SID");
    }
    for (id, sid) in ids.iter().zip(want) {
        assert_eq!(&now[id], sid, "new item {id}");
    }
    let distinct: BTreeSet<&Vec<u16>> = now.values().collect();
    assert_eq!(distinct.len(), now.len(), "SIDs are not unique");
    let all_ids: Vec<u64> = now.keys().copied().collect();
    let sids = after.sids(&all_ids).unwrap();
    assert_eq!(after.items(&sids).unwrap(), all_ids);
    let rows: Vec<&[u16]> = sids.chunks(after.levels()).collect();
    for (p, &id) in after.item_ids_by_sid().iter().enumerate() {
        assert_eq!(after.position_of_item(id), Some(p));
    }
    assert!(rows.iter().all(|r| after.position_of_sid(r).is_some()));
    let report = after.repair_report();
    assert_eq!(report.items, now.len() as u64);
    let reloaded = SidIndex::from_bytes(&after.to_bytes().unwrap()).unwrap();
    assert_eq!(all_sids(&reloaded), now);
    assert_eq!(reloaded.generation(), after.generation());
    assert_eq!(reloaded.repair_report(), report);
}

/// A dataset split into a built part and new items (with new codes of the index's input width).
fn split_dataset() -> impl Strategy<Value = (Vec<u64>, Vec<u16>, usize, Vec<u32>, usize, bool)> {
    super::dataset().prop_flat_map(|(ids, codes, levels, sizes)| {
        let n = ids.len();
        (Just(ids), Just(codes), Just(levels), Just(sizes), 0..=n, any::<bool>())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn extend_keeps_old_sids_and_matches_reference(
        (ids, codes, levels, sizes, split, full_width) in split_dataset()
    ) {
        let base = SidIndex::build(&ids[..split], &codes[..split * levels], levels, Some(&sizes)).unwrap();
        let new_ids = &ids[split..];
        let mut rows: Vec<Vec<u16>> = codes[split * levels..].chunks(levels).map(<[u16]>::to_vec).collect();
        // An index with a disambiguation level takes either width.
        let width = if full_width && base.repair_report().level_appended {
            for row in &mut rows {
                row.push(0);
            }
            levels + 1
        } else {
            levels
        };
        let flat: Vec<u16> = rows.concat();
        let want = reference_extend(&base, new_ids, &rows);
        match (base.extend(new_ids, &flat, width), want) {
            (Ok(after), Ok(want)) => check_extended(&base, &after, new_ids, &want),
            (Err(Gr2Error::InvalidInput(msg)), Err(rows)) => {
                let first = *rows.iter().next().unwrap();
                prop_assert!(msg.contains(&format!("item id {} (row {first})", new_ids[first])), "{}", msg);
                prop_assert!(msg.contains("without moving existing items"), "{}", msg);
            }
            (got, want) => prop_assert!(false, "got {:?}, reference {:?}", got.map(|i| i.len()), want),
        }
    }

    #[test]
    fn extend_of_an_empty_index_is_build((ids, codes, levels, sizes) in super::dataset()) {
        let built = SidIndex::build(&ids, &codes, levels, Some(&sizes)).unwrap();
        if built.repair_report().level_appended {
            return Ok(()); // build numbers full prefixes on a new level; extend never adds one
        }
        let empty = SidIndex::build(&[], &[], levels, Some(&sizes)).unwrap();
        let extended = empty.extend(&ids, &codes, levels).unwrap();
        prop_assert_eq!(all_sids(&extended), all_sids(&built));
        let (a, b) = (extended.repair_report(), built.repair_report());
        prop_assert_eq!(
            (a.unique_items_before, a.distinct_sids_before, a.items_moved, a.max_move_distance),
            (b.unique_items_before, b.distinct_sids_before, b.items_moved, b.max_move_distance)
        );
        prop_assert_eq!(&a.collision_group_sizes, &b.collision_group_sizes);
    }

    #[test]
    fn remove_keeps_the_others(
        (ids, codes, levels, sizes) in super::dataset(),
        picks in proptest::collection::vec(any::<bool>(), 120),
    ) {
        let index = SidIndex::build(&ids, &codes, levels, Some(&sizes)).unwrap();
        let gone: Vec<u64> = ids.iter().zip(&picks).filter(|(_, &p)| p).map(|(&id, _)| id).collect();
        let after = index.remove(&gone).unwrap();
        let (before, now) = (all_sids(&index), all_sids(&after));
        prop_assert_eq!(now.len(), ids.len() - gone.len());
        prop_assert_eq!(after.generation(), 1);
        prop_assert_eq!(after.levels(), index.levels());
        for id in &gone {
            prop_assert!(!after.contains(*id));
        }
        for (id, sid) in &now {
            prop_assert_eq!(Some(sid), before.get(id));
        }
        let kept: Vec<u64> = now.keys().copied().collect();
        let sids = after.sids(&kept).unwrap();
        prop_assert_eq!(after.items(&sids).unwrap(), kept);
        let reloaded = SidIndex::from_bytes(&after.to_bytes().unwrap()).unwrap();
        prop_assert_eq!(all_sids(&reloaded), now.clone());

        // Removed items can be added back; the survivors still keep their SIDs.
        let back: Vec<u16> = gone.iter().flat_map(|id| before[id][..levels].to_vec()).collect();
        if let Ok(again) = after.extend(&gone, &back, levels) {
            let again = all_sids(&again);
            for (id, sid) in &now {
                prop_assert_eq!(Some(sid), again.get(id));
            }
            prop_assert_eq!(again.len(), ids.len());
        }
    }
}

#[test]
fn extend_moves_only_new_items() {
    // Existing: 1 -> (0, 5), 2 -> (0, 6). New 3 collides with item 1 and moves to the nearest free
    // code (4, ties low); new 4 and 5 share (1, 0): 4 keeps it, 5 moves to (1, 1).
    let base = SidIndex::build(&[1, 2], &[0, 5, 0, 6], 2, Some(&[4, 10])).unwrap();
    let after = base.extend(&[5, 3, 4], &[1, 0, 0, 5, 1, 0], 2).unwrap();
    assert_eq!(after.sids(&[1, 2, 3, 4, 5]).unwrap(), vec![0, 5, 0, 6, 0, 4, 1, 0, 1, 1]);
    let report = after.repair_report();
    assert_eq!((report.items, report.items_moved, report.max_move_distance), (5, 2, 1));
    assert_eq!(report.unique_items_before, 2);
    assert_eq!(report.collision_group_sizes, vec![(2, 2)]);
    assert_eq!(after.generation(), 1);
    assert_eq!(after.remove(&[3]).unwrap().generation(), 2);
    assert_eq!(base.generation(), 0);
}

#[test]
fn extend_uses_the_disambiguation_level_when_a_prefix_is_full() {
    // Level 1 of size 2 is full under prefix (1): 10 -> (1,0,0), 20 -> (1,1,0), 30 -> (1,0,1).
    let base = SidIndex::build(&[10, 20, 30], &[1, 0, 1, 0, 1, 0], 2, Some(&[2, 2])).unwrap();
    assert_eq!(base.levels(), 3);
    // New 40 on (1, 1): the prefix is full; (1,1,1) is free on the disambiguation level.
    let after = base.extend(&[40], &[1, 1], 2).unwrap();
    assert_eq!(after.sids(&[40]).unwrap(), vec![1, 1, 1]);
    assert_eq!(after.sids(&[10, 20, 30]).unwrap(), base.sids(&[10, 20, 30]).unwrap());
    // Full width codes are accepted too; a free SID is kept as given.
    let after = base.extend(&[40], &[0, 1, 1], 3).unwrap();
    assert_eq!(after.sids(&[40]).unwrap(), vec![0, 1, 1]);
    // Nothing free left under (1, *, *): a typed error naming the row, the old index intact.
    let full = base.extend(&[40], &[1, 1], 2).unwrap();
    let err = full.extend(&[7, 50], &[0, 0, 1, 0], 2).unwrap_err();
    let Gr2Error::InvalidInput(msg) = err else { panic!("expected InvalidInput, got {err:?}") };
    assert!(msg.contains("item id 50 (row 1)") && msg.contains("rebuild"), "{msg}");
    assert_eq!(full.len(), 4);
}

#[test]
fn extend_and_remove_reject_bad_input() {
    let base = SidIndex::build(&[1, 2, 3], &[0, 0, 0, 1, 0, 2], 2, Some(&[4, 4])).unwrap();
    let err = message(base.extend(&[9, 2], &[1, 1, 1, 2], 2).unwrap_err());
    assert!(err.contains("item id 2 (row 1) is already in the SID index"), "{err}");
    let err = message(base.extend(&[9, 8, 9], &[1, 1, 1, 2, 1, 3], 2).unwrap_err());
    assert!(err.contains("item id 9 appears more than once") && err.contains("rows 0 and 2"), "{err}");
    let err = message(base.extend(&[9], &[1, 1, 1], 3).unwrap_err());
    assert!(err.contains("codes have 3 levels but the SID index takes 2"), "{err}");
    let err = message(base.extend(&[9, 8], &[1, 1, 1, 7], 2).unwrap_err());
    assert!(err.contains("codes[1, 1] = 7"), "{err}");
    assert!(base.extend(&[9], &[1], 2).is_err());
    assert!(matches!(base.remove(&[1, 5]), Err(Gr2Error::UnknownItem(m)) if m.contains("item id 5 (row 1)")));
    let err = message(base.remove(&[3, 1, 3]).unwrap_err());
    assert!(err.contains("item id 3 appears more than once") && err.contains("rows 0 and 2"), "{err}");
    assert_eq!(base.remove(&[]).unwrap().len(), 3);
    assert_eq!(base.remove(&[1, 2, 3]).unwrap().len(), 0);
}

#[test]
fn large_extend_and_remove_cross_chunks() {
    // Enough items for several parallel fill chunks, narrow and wide keys.
    for (levels, size) in [(3usize, 256u32), (5, 256)] {
        let n = 200_000usize;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let codes: Vec<u16> = (0..n * levels)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % u64::from(size)) as u16
            })
            .collect();
        let ids: Vec<u64> = (0..n as u64).map(|i| i * 3).collect();
        let split = n * 9 / 10;
        let base = SidIndex::build(&ids[..split], &codes[..split * levels], levels, Some(&vec![size; levels])).unwrap();
        let after = base.extend(&ids[split..], &codes[split * levels..], levels).unwrap();
        assert_eq!(after.sids(&ids[..split]).unwrap(), base.sids(&ids[..split]).unwrap());
        let all = after.sids(&ids).unwrap();
        assert_eq!(after.items(&all).unwrap(), ids);
        let distinct: BTreeSet<&[u16]> = all.chunks(levels).collect();
        assert_eq!(distinct.len(), n);
        let gone: Vec<u64> = ids.iter().copied().filter(|id| id % 7 == 0).collect();
        let smaller = after.remove(&gone).unwrap();
        let kept: Vec<u64> = ids.iter().copied().filter(|id| id % 7 != 0).collect();
        assert_eq!(smaller.sids(&kept).unwrap(), after.sids(&kept).unwrap());
        assert_eq!(smaller.items(&smaller.sids(&kept).unwrap()).unwrap(), kept);
        SidIndex::from_bytes(&smaller.to_bytes().unwrap()).unwrap();
    }
}

fn message(err: Gr2Error) -> String {
    err.to_string()
}
