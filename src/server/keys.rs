//! Key filters: the record keys a connection asks for (`?key=`, `?key_base64=`, a token's
//! `keys`), compared as the bytes of the record's Kafka key, and the index by key through
//! which the hub finds a record's receivers. A connection's keys are stored once, in one
//! [`KeySet`]: connections that ask for the same keys share it, and the index of every
//! endpoint refers to it rather than copying its keys.

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use indexmap::IndexSet;

/// Record keys, sorted, without repeats, in one allocation for the bytes and one for where
/// each key ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct KeySet {
    bytes: Box<[u8]>,
    /// The end of each key in `bytes`.
    ends: Box<[u32]>,
}

impl KeySet {
    /// The set of `keys`; repeats count once. Keys past 4 GiB in all are dropped, far beyond
    /// what a request head can carry.
    pub fn new<K: AsRef<[u8]>>(keys: impl IntoIterator<Item = K>) -> Self {
        let mut keys: Vec<K> = keys.into_iter().collect();
        keys.sort_unstable_by(|a, b| a.as_ref().cmp(b.as_ref()));
        keys.dedup_by(|a, b| a.as_ref() == b.as_ref());
        let mut bytes = Vec::with_capacity(keys.iter().map(|key| key.as_ref().len()).sum());
        let mut ends = Vec::with_capacity(keys.len());
        for key in &keys {
            let Ok(end) = u32::try_from(bytes.len() + key.as_ref().len()) else {
                break;
            };
            bytes.extend_from_slice(key.as_ref());
            ends.push(end);
        }
        Self {
            bytes: bytes.into(),
            ends: ends.into(),
        }
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The key at `index` in sorted order; empty past the end.
    pub fn get(&self, index: usize) -> &[u8] {
        let start = match index.checked_sub(1) {
            None => 0,
            Some(before) => self.ends.get(before).map_or(0, |&end| end as usize),
        };
        let end = self.ends.get(index).map_or(start, |&end| end as usize);
        self.bytes.get(start..end).unwrap_or_default()
    }

    /// The keys in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.len()).map(|index| self.get(index))
    }

    /// Where `key` is in sorted order, if it is one of the keys.
    pub fn position(&self, key: &[u8]) -> Option<usize> {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let middle = low + (high - low) / 2;
            match self.get(middle).cmp(key) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return Some(middle),
            }
        }
        None
    }

    /// Whether `key` is one of the keys.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.position(key).is_some()
    }
}

/// A connection's id in the hub.
pub(crate) type ClientId = u64;
type GroupId = u64;

/// What the index is charged for one key of a distinct set, besides the key's bytes: its
/// entry in the map by key (a borrowed key and the groups that hold it) at the map's load,
/// and where the key ends in its set. Measured by `tests/key_filter_memory.rs`.
pub(crate) const KEY_COST_BYTES: usize = 100;
/// What the index is charged for a distinct set, besides its keys: the group, its members'
/// map and the lookup by set.
const SET_COST_BYTES: usize = 256;

/// What keeping `keys` costs the index, as charged against its budget.
pub(crate) fn key_set_cost(keys: &KeySet) -> usize {
    SET_COST_BYTES + keys.bytes.len() + keys.len() * KEY_COST_BYTES
}

/// A key of the index: the bytes of one key of a set, borrowed from that set.
#[derive(Debug)]
struct KeyRef {
    set: Arc<KeySet>,
    index: usize,
}

impl KeyRef {
    fn bytes(&self) -> &[u8] {
        self.set.get(self.index)
    }
}

impl Borrow<[u8]> for KeyRef {
    fn borrow(&self) -> &[u8] {
        self.bytes()
    }
}

// Hashed and compared as its bytes, so that the index is searched with a record's key.
impl Hash for KeyRef {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.bytes().hash(state);
    }
}

impl PartialEq for KeyRef {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for KeyRef {}

/// The groups whose set holds one key: nearly always one. Many are kept in a set, so that
/// a group leaves in constant time however many share the key: with a list, connections
/// with overlapping sets made leaving quadratic, under the index's write lock.
#[derive(Debug)]
enum Groups {
    One(GroupId),
    Many(Box<IndexSet<GroupId>>),
}

impl Groups {
    fn iter(&self) -> impl Iterator<Item = &GroupId> {
        let (one, many) = match self {
            Self::One(group) => (Some(group), None),
            Self::Many(groups) => (None, Some(groups.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    fn first(&self) -> Option<GroupId> {
        self.iter().next().copied()
    }

    fn push(&mut self, group: GroupId) {
        match self {
            Self::One(first) => *self = Self::Many(Box::new(IndexSet::from([*first, group]))),
            Self::Many(groups) => {
                groups.insert(group);
            }
        }
    }

    /// Removes `group`; whether any is left.
    fn remove(&mut self, group: GroupId) -> bool {
        match self {
            Self::One(only) => *only != group,
            Self::Many(groups) => {
                groups.swap_remove(&group);
                if let Some(&only) = groups.first()
                    && groups.len() == 1
                {
                    *self = Self::One(only);
                } else if groups.len() * 4 < groups.capacity() {
                    groups.shrink_to_fit();
                }
                self.first().is_some()
            }
        }
    }
}

/// The connections that asked for the same keys, by endpoint.
#[derive(Debug)]
struct Group<T> {
    keys: Arc<KeySet>,
    /// Each connection once for each of its endpoints.
    members: BTreeMap<(usize, ClientId), T>,
    /// What the index was charged for the set.
    cost: usize,
}

impl<T> Group<T> {
    fn on(&self, endpoint: usize) -> impl Iterator<Item = (ClientId, &T)> {
        self.members
            .range((endpoint, ClientId::MIN)..=(endpoint, ClientId::MAX))
            .map(|(&(_, client), value)| (client, value))
    }
}

/// The budget of a key index was reached: a connection with a new set of keys is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the server holds as many key filters as its budget allows ({budget} bytes, server.key_filter_memory_mib); retry later, on another server, or with fewer keys"
)]
pub struct KeyBudgetReached {
    /// The budget, in bytes.
    pub budget: usize,
}

/// The keyed connections of every endpoint, found by key. Connections with the same keys
/// form one group, so that the index has an entry per key and distinct set, not per
/// connection or per endpoint: a connection costs one entry per key however many endpoints
/// it names, and one whose keys another one has asked for already costs none. What the
/// distinct sets cost is charged against a budget; past it a new set is refused.
#[derive(Debug)]
pub(crate) struct KeyIndex<T> {
    groups: HashMap<GroupId, Group<T>>,
    group_of: HashMap<Arc<KeySet>, GroupId>,
    by_key: HashMap<KeyRef, Groups>,
    next_group: GroupId,
    /// What the distinct sets held cost, by [`key_set_cost`].
    held: usize,
    budget: usize,
}

impl<T> Default for KeyIndex<T> {
    fn default() -> Self {
        Self::with_budget(usize::MAX)
    }
}

impl<T> KeyIndex<T> {
    /// An empty index whose distinct sets may cost `budget` bytes in all.
    pub(crate) fn with_budget(budget: usize) -> Self {
        Self {
            groups: HashMap::new(),
            group_of: HashMap::new(),
            by_key: HashMap::new(),
            next_group: 0,
            held: 0,
            budget,
        }
    }

    /// What the distinct sets held cost, in bytes.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held
    }

    /// Adds `client` with `keys` on `endpoints`, as `value` of each endpoint; returns the
    /// set the index keeps for them (an equal one already kept, or `keys`), for the caller
    /// to keep instead of its own. A new set that would take the index past its budget is
    /// refused.
    pub(crate) fn insert(
        &mut self,
        keys: &Arc<KeySet>,
        endpoints: &[usize],
        client: ClientId,
        value: impl Fn(usize) -> T,
    ) -> Result<Arc<KeySet>, KeyBudgetReached> {
        let members = endpoints
            .iter()
            .map(|&endpoint| ((endpoint, client), value(endpoint)));
        if let Some(group) = self
            .group_of
            .get(&**keys)
            .and_then(|id| self.groups.get_mut(id))
        {
            group.members.extend(members);
            return Ok(Arc::clone(&group.keys));
        }
        let cost = key_set_cost(keys);
        if self.held.saturating_add(cost) > self.budget {
            return Err(KeyBudgetReached {
                budget: self.budget,
            });
        }
        self.held += cost;
        let id = self.next_group;
        self.next_group += 1;
        for index in 0..keys.len() {
            match self.by_key.entry(KeyRef {
                set: Arc::clone(keys),
                index,
            }) {
                Entry::Occupied(mut entry) => entry.get_mut().push(id),
                Entry::Vacant(entry) => {
                    entry.insert(Groups::One(id));
                }
            }
        }
        self.group_of.insert(Arc::clone(keys), id);
        self.groups.insert(
            id,
            Group {
                keys: Arc::clone(keys),
                members: members.collect(),
                cost,
            },
        );
        Ok(Arc::clone(keys))
    }

    /// Removes `client`, added with `keys` on `endpoints`; whether it was there.
    pub(crate) fn remove(&mut self, keys: &KeySet, endpoints: &[usize], client: ClientId) -> bool {
        let Some(&id) = self.group_of.get(keys) else {
            return false;
        };
        let Some(group) = self.groups.get_mut(&id) else {
            return false;
        };
        let mut found = false;
        for &endpoint in endpoints {
            found |= group.members.remove(&(endpoint, client)).is_some();
        }
        if !group.members.is_empty() {
            return found;
        }
        let Some(group) = self.groups.remove(&id) else {
            return found;
        };
        self.held -= group.cost;
        self.group_of.remove(&*group.keys);
        for key in group.keys.iter() {
            let Some((key_ref, mut rest)) = self.by_key.remove_entry(key) else {
                continue;
            };
            if !rest.remove(id) {
                continue;
            }
            // The entry's key may be the bytes of the set going away: take them from a set
            // that stays, so that the set is freed.
            let key_ref = match rest.first().and_then(|g| self.groups.get(&g)) {
                Some(other) if Arc::ptr_eq(&key_ref.set, &group.keys) => {
                    other.keys.position(key).map_or(key_ref, |index| KeyRef {
                        set: Arc::clone(&other.keys),
                        index,
                    })
                }
                _ => key_ref,
            };
            self.by_key.insert(key_ref, rest);
        }
        found
    }

    /// The connections of `endpoint` that asked for `key`, each once.
    pub(crate) fn receivers<'a>(
        &'a self,
        endpoint: usize,
        key: &[u8],
    ) -> impl Iterator<Item = (ClientId, &'a T)> {
        self.by_key
            .get(key)
            .into_iter()
            .flat_map(Groups::iter)
            .filter_map(|id| self.groups.get(id))
            .flat_map(move |group| group.on(endpoint))
    }

    /// How many connections of `endpoint` asked for `key`.
    pub(crate) fn count(&self, endpoint: usize, key: &[u8]) -> usize {
        self.receivers(endpoint, key).count()
    }

    /// Every keyed connection of `endpoint`, each once.
    pub(crate) fn all(&self, endpoint: usize) -> impl Iterator<Item = (ClientId, &T)> {
        self.groups
            .values()
            .flat_map(move |group| group.on(endpoint))
    }

    /// Whether it holds no connection: the tests check that leaving empties it.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
            && self.by_key.is_empty()
            && self.group_of.is_empty()
            && self.held == 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    /// Whether every key of the index is borrowed from one of its groups' sets.
    fn keys_are_borrowed_from_groups<T>(index: &KeyIndex<T>) -> bool {
        index.by_key.keys().all(|key| {
            index
                .groups
                .values()
                .any(|group| Arc::ptr_eq(&key.set, &group.keys))
        })
    }

    #[test]
    fn a_set_is_sorted_without_repeats_and_searchable() {
        let set = KeySet::new(["b", "a", "", "b", "ab"]);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![&b""[..], b"a", b"ab", b"b"]
        );
        assert!(set.contains(b"ab") && set.contains(b"") && !set.contains(b"c"));
        assert_eq!(set.get(9), b"");
        assert!(KeySet::new(Vec::<String>::new()).is_empty());
    }

    #[test]
    fn keys_are_stored_once_for_every_endpoint_and_every_connection_with_the_same_set() {
        let mut index = KeyIndex::default();
        let keys = Arc::new(KeySet::new((0..1000).map(|k| format!("k{k}"))));
        // One connection on fifty endpoints: one entry per key, whatever the endpoints.
        let endpoints: Vec<usize> = (0..50).collect();
        let kept = index
            .insert(&keys, &endpoints, 1, |_| ())
            .expect("no budget");
        assert!(Arc::ptr_eq(&kept, &keys));
        drop(kept);
        assert_eq!(index.by_key.len(), 1000);
        assert!(keys_are_borrowed_from_groups(&index));
        // A second connection with the same keys, parsed apart, gets the set already kept
        // and adds one entry to the group, none to the index.
        let same = Arc::new(KeySet::new((0..1000).rev().map(|k| format!("k{k}"))));
        let kept = index.insert(&same, &[7], 2, |_| ()).expect("no budget");
        assert!(Arc::ptr_eq(&kept, &keys));
        drop(kept);
        assert_eq!((index.groups.len(), index.by_key.len()), (1, 1000));
        drop(same);
        // What the index holds of the set: its group's, the group's lookup and one per key.
        assert_eq!(Arc::strong_count(&keys), 1 + 1 + 1 + 1000);
        assert_eq!(index.count(7, b"k7"), 2);
        assert_eq!(index.count(8, b"k7"), 1);
        assert_eq!(index.count(50, b"k7"), 0);
        assert!(index.remove(&keys, &endpoints, 1));
        assert_eq!(index.count(8, b"k7"), 0);
    }

    #[test]
    fn a_new_set_past_the_budget_is_refused_and_a_shared_one_is_not() {
        let first = Arc::new(KeySet::new(["a", "b"]));
        let second = Arc::new(KeySet::new(["c", "d"]));
        let mut index = KeyIndex::with_budget(key_set_cost(&first) + 1);
        index.insert(&first, &[0], 1, |_| ()).expect("within");
        assert_eq!(
            index.insert(&second, &[0], 2, |_| ()),
            Err(KeyBudgetReached {
                budget: key_set_cost(&first) + 1
            })
        );
        index.insert(&first, &[0], 3, |_| ()).expect("shared: free");
        assert!(index.remove(&first, &[0], 1) && index.remove(&first, &[0], 3));
        assert_eq!(index.held_bytes(), 0);
        index.insert(&second, &[0], 2, |_| ()).expect("given back");
    }

    #[test]
    fn a_set_that_goes_is_freed_though_others_share_its_keys() {
        let mut index = KeyIndex::default();
        let first = Arc::new(KeySet::new(["a", "b"]));
        let second = Arc::new(KeySet::new(["b", "c"]));
        index.insert(&first, &[0], 1, |_| ()).expect("no budget");
        index.insert(&second, &[0], 2, |_| ()).expect("no budget");
        assert!(index.remove(&first, &[0], 1));
        assert_eq!(Arc::strong_count(&first), 1, "no longer borrowed for b");
        assert!(keys_are_borrowed_from_groups(&index));
        assert_eq!(
            index.receivers(0, b"b").map(|(c, _)| c).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(index.receivers(0, b"a").count(), 0);
        assert!(!index.remove(&first, &[0], 1));
        assert!(index.remove(&second, &[0], 2));
        assert!(index.is_empty());
    }

    /// Keys from a small alphabet, so that sets overlap and repeat; some not UTF-8.
    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(0xff)], 0..3),
            proptest::collection::vec(any::<u8>(), 0..6),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(ClientId, Vec<Vec<u8>>, Vec<usize>),
        Remove(ClientId),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0..8_u64,
                proptest::collection::vec(key(), 0..5),
                proptest::collection::btree_set(0..3_usize, 1..3)
            )
                .prop_map(|(client, keys, endpoints)| Op::Insert(
                    client,
                    keys,
                    endpoints.into_iter().collect()
                )),
            (0..8_u64).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #[test]
        fn fuzz_key_set_agrees_with_a_sorted_set(keys in proptest::collection::vec(key(), 0..40), probe in key()) {
            let set = KeySet::new(&keys);
            let reference: BTreeSet<Vec<u8>> = keys.iter().cloned().collect();
            prop_assert_eq!(set.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), reference.iter().cloned().collect::<Vec<_>>());
            prop_assert_eq!(set.contains(&probe), reference.contains(&probe));
            for key in &keys {
                prop_assert!(set.contains(key));
            }
        }

        #[test]
        fn fuzz_key_index_matches_a_naive_reference(ops in proptest::collection::vec(op(), 0..60), probes in proptest::collection::vec(key(), 0..8)) {
            let mut index = KeyIndex::default();
            // The naive reference: each connection with its keys and endpoints.
            let mut clients: BTreeMap<ClientId, (Arc<KeySet>, Vec<usize>)> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(client, keys, endpoints) => {
                        if let Some((old, on)) = clients.remove(&client) {
                            prop_assert!(index.remove(&old, &on, client));
                        }
                        let kept = index.insert(&Arc::new(KeySet::new(&keys)), &endpoints, client, |_| client).expect("no budget");
                        prop_assert_eq!(&*kept, &KeySet::new(&keys));
                        clients.insert(client, (kept, endpoints));
                    }
                    Op::Remove(client) => {
                        let removed = clients.get(&client).is_some_and(|(keys, on)| index.remove(keys, on, client));
                        prop_assert_eq!(removed, clients.remove(&client).is_some());
                    }
                }
                prop_assert!(keys_are_borrowed_from_groups(&index));
                let every_key = clients.values().flat_map(|(keys, _)| keys.iter().map(<[u8]>::to_vec)).chain(probes.iter().cloned());
                for key in every_key {
                    for endpoint in 0..3 {
                        let mut found: Vec<ClientId> = index.receivers(endpoint, &key).map(|(client, &value)| { assert_eq!(client, value); client }).collect();
                        found.sort_unstable();
                        let expected: Vec<ClientId> = clients.iter().filter(|(_, (keys, on))| keys.contains(&key) && on.contains(&endpoint)).map(|(&client, _)| client).collect();
                        prop_assert_eq!(index.count(endpoint, &key), expected.len());
                        prop_assert_eq!(found, expected);
                    }
                }
                let mut all: Vec<ClientId> = index.all(0).map(|(client, _)| client).collect();
                all.sort_unstable();
                prop_assert_eq!(all, clients.iter().filter(|(_, (_, on))| on.contains(&0)).map(|(&client, _)| client).collect::<Vec<_>>());
            }
            for (client, (keys, on)) in std::mem::take(&mut clients) {
                prop_assert!(index.remove(&keys, &on, client));
            }
            prop_assert!(index.is_empty());
        }
    }
}
