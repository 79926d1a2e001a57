//! The difference between two sorted maps in one walk of both (pure): what the plan's
//! neighbour entries and the DNS deltas for the data-plane daemon both need, with 10,000s
//! of entries, every pass or every change.

use std::cmp::Ordering;
use std::collections::BTreeMap;

/// What differs from one map to another, borrowed from them, in key order.
#[derive(Debug, PartialEq, Eq)]
pub struct MapDiff<'a, K, V> {
    /// Entries of the new map that the old one lacks or holds with another value.
    pub changed: Vec<(&'a K, &'a V)>,
    /// Entries of the old map whose key the new one lacks (with the old value).
    pub removed: Vec<(&'a K, &'a V)>,
}

pub fn map_diff<'a, K: Ord, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> MapDiff<'a, K, V> {
    let mut diff = MapDiff { changed: Vec::new(), removed: Vec::new() };
    let (mut was, mut is) = (old.iter().peekable(), new.iter().peekable());
    loop {
        let order = match (was.peek(), is.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        match order {
            Ordering::Less => diff.removed.extend(was.next()),
            Ordering::Greater => diff.changed.extend(is.next()),
            Ordering::Equal => {
                if let (Some((_, a)), Some(entry)) = (was.next(), is.next()) {
                    if a != entry.1 {
                        diff.changed.push(entry);
                    }
                }
            }
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_changed_kept_and_removed() {
        let old = BTreeMap::from([(1, 'a'), (2, 'b'), (3, 'c')]);
        let new = BTreeMap::from([(2, 'B'), (3, 'c'), (4, 'd')]);
        let d = map_diff(&old, &new);
        assert_eq!(d.changed, [(&2, &'B'), (&4, &'d')]);
        assert_eq!(d.removed, [(&1, &'a')]);
        let same = map_diff(&old, &old);
        assert!(same.changed.is_empty() && same.removed.is_empty());
    }
}
