//! Which record ids the files already hold, per tenant and UTC day.
//!
//! Stream sequences say what the sink wrote only within one stream and one consumer's
//! history. A record published again under a new sequence (the stream was created again, or
//! a producer republished it after the stream's duplicate window) must still not become a
//! second row. A record always lands in the folder of its tenant and the UTC day of its
//! `finished_at`, and a republished record carries the same `record_id`, tenant and
//! `finished_at`, so the only place a duplicate can be is that one folder: the index is kept
//! per folder and checked before a batch is written. A task that runs again (a redelivery
//! after the duplicate window) records the same id with a later `finished_at`, which may
//! fall on the next day: a row is checked against its own day's folder and the day
//! before. (A re-run more than a day later would still make a second row.)
//!
//! The files are the truth: a folder's ids are read from the `record_id` column of its
//! Parquet files (footer and that column only) the first time a batch has a row for it, and
//! kept up to date as batches are written. Nothing extra is written per batch. A folder no
//! batch touched for [`INDEX_IDLE`] is dropped and read again if a record for it comes,
//! so memory holds the folders being written now and the day before each (today's and
//! yesterday's, per tenant), about 24 bytes per row, and correctness never depends on what
//! was dropped. Ids are kept as 128-bit hashes under keys drawn at start: two different
//! ids collide with probability 2^-128.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path;

use crate::sink::{Group, Row};
use crate::store::{Date, for_each_record_id, partition_path};
use crate::{Error, Result};

/// How long a folder's ids stay in memory after the last batch that had a row for it.
pub const INDEX_IDLE: Duration = Duration::from_secs(10 * 60);

/// A folder: one tenant, one UTC day.
pub type Folder = (String, Date);

/// The record ids of the folders in memory.
#[derive(Debug, Default)]
pub struct Index {
    /// By tenant, then day: looked up with the record's `&str` tenant, no copy per row.
    folders: HashMap<String, HashMap<Date, Ids>>,
    keys: (RandomState, RandomState),
}

#[derive(Debug)]
struct Ids {
    ids: HashSet<u128, BuildHasherDefault<Prehashed>>,
    touched: Instant,
}

/// The keys are already keyed hashes: the set uses their low bits instead of hashing again
/// (a third of the index's time per record).
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u128` keys go in; mix anything else in rather than ignore it.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// Ids of a batch's rows by folder, to add once the batch's objects are durable.
pub struct Pending(Vec<(Folder, Vec<u128>)>);

fn day_of(row: &Row) -> Date {
    Date::from_unix_micros(row.1.finished_at_us)
}

/// The day before a row's: a task run again after midnight (a redelivery after the
/// duplicate window) records the same id with a later `finished_at`, one folder on.
fn day_before(row: &Row) -> Date {
    Date::from_days(row.1.finished_at_us.div_euclid(86_400_000_000) - 1)
}

/// The folders a row's id may already be in: its own, and the day before.
fn folders_of(row: &Row) -> [Date; 2] {
    [day_of(row), day_before(row)]
}

impl Index {
    fn key(&self, id: &str) -> u128 {
        (u128::from(self.keys.0.hash_one(id)) << 64) | u128::from(self.keys.1.hash_one(id))
    }

    /// The folders of `rows` whose ids are not in memory, each once.
    pub fn missing(&self, rows: &[Row]) -> Vec<Folder> {
        let mut out: Vec<Folder> = Vec::new();
        for row in rows {
            let tenant = row.1.tenant.as_str();
            for day in folders_of(row) {
                let loaded = self
                    .folders
                    .get(tenant)
                    .is_some_and(|days| days.contains_key(&day));
                if !loaded && !out.iter().any(|(t, d)| t == tenant && *d == day) {
                    out.push((tenant.to_string(), day));
                }
            }
        }
        out
    }

    /// Reads the ids of one folder from its Parquet files, leaving out the objects named in
    /// `exclude` (those of an interrupted batch, which is being written again).
    pub async fn load(
        &mut self,
        store: &Arc<dyn ObjectStore>,
        prefix: &Path,
        folder: &Folder,
        exclude: &[String],
    ) -> Result<()> {
        let dir = partition_path(prefix, &folder.0, folder.1);
        let mut ids = HashSet::default();
        let mut listing = store.list(Some(&dir));
        let mut files = Vec::new();
        while let Some(meta) = listing.next().await {
            match meta {
                Ok(m) => files.push(m),
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(Error::Store(format!("listing {dir}: {e}"))),
            }
        }
        for meta in files {
            if meta.location.extension() != Some("parquet")
                || exclude.iter().any(|x| x.as_str() == meta.location.as_ref())
            {
                continue;
            }
            for_each_record_id(store, &meta.location, meta.size, |id| {
                ids.insert(self.key(id));
            })
            .await?;
        }
        tracing::debug!(folder = %dir, ids = ids.len(), "read the record ids of an audit folder");
        self.folders.entry(folder.0.clone()).or_default().insert(
            folder.1,
            Ids {
                ids,
                touched: Instant::now(),
            },
        );
        Ok(())
    }

    /// Keeps the rows whose id is not in the files yet; the second value counts the others.
    /// Every folder of `rows` must be loaded ([`Index::missing`] is empty).
    pub fn retain_new(&mut self, rows: Vec<Row>) -> (Vec<Row>, usize) {
        let now = Instant::now();
        let before = rows.len();
        let kept: Vec<Row> = rows
            .into_iter()
            .filter(|row| {
                let key = self.key(&row.1.record_id);
                let Some(days) = self.folders.get_mut(row.1.tenant.as_str()) else {
                    return true;
                };
                let mut seen = false;
                for day in folders_of(row) {
                    if let Some(f) = days.get_mut(&day) {
                        f.touched = now;
                        seen |= f.ids.contains(&key);
                    }
                }
                !seen
            })
            .collect();
        let known = before - kept.len();
        (kept, known)
    }

    /// The ids of `groups`, to [`Index::commit`] once their objects are written.
    pub fn pending(&self, groups: &[Group]) -> Pending {
        Pending(
            groups
                .iter()
                .map(|g| {
                    (
                        (g.tenant.clone(), g.date),
                        g.records.iter().map(|r| self.key(&r.record_id)).collect(),
                    )
                })
                .collect(),
        )
    }

    /// Adds ids whose rows are durable; drops folders idle for [`INDEX_IDLE`].
    pub fn commit(&mut self, pending: Pending) {
        let now = Instant::now();
        for (folder, keys) in pending.0 {
            // A folder dropped meanwhile is read from the files again when needed.
            if let Some(f) = self
                .folders
                .get_mut(&folder.0)
                .and_then(|days| days.get_mut(&folder.1))
            {
                f.ids.extend(keys);
                f.touched = now;
            }
        }
        for days in self.folders.values_mut() {
            days.retain(|_, f| now.duration_since(f.touched) < INDEX_IDLE);
        }
        self.folders.retain(|_, days| !days.is_empty());
    }

    /// Ids in memory, all folders together.
    pub fn len(&self) -> usize {
        self.folders
            .values()
            .flat_map(|days| days.values())
            .map(|f| f.ids.len())
            .sum()
    }

    /// True when no id is in memory.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aob_model::audit::{AuditKind, DecisionRecord};
    use object_store::ObjectStoreExt;

    const NOV21: i64 = 1_795_219_200 * 1_000_000;

    fn row(seq: u64, id: &str, tenant: &str, at: i64) -> Row {
        (
            seq,
            Arc::new(DecisionRecord::new(
                id.into(),
                tenant,
                "run",
                AuditKind::TaskExecuted,
                "fn.transform",
                at,
            )),
        )
    }

    #[tokio::test]
    async fn ids_in_the_files_of_the_same_folder_are_left_out() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let prefix = Path::from("audit");
        let day = Date::from_unix_micros(NOV21);
        let old = [row(1, "a", "acme", NOV21), row(2, "b", "acme", NOV21)];
        let records: Vec<DecisionRecord> = old.iter().map(|r| (*r.1).clone()).collect();
        let written = crate::object_path(&prefix, "acme", day, 1, 1, 2);
        store
            .put(&written, crate::encode(&records).unwrap().into())
            .await
            .unwrap();

        // Again: "a" (same folder), "b" of another tenant, "c" new, "a" the next day (a
        // task run again after midnight), "a" two days later.
        const DAY: i64 = 86_400_000_000;
        let again = vec![
            row(1, "a", "acme", NOV21),
            row(2, "b", "beta", NOV21),
            row(3, "c", "acme", NOV21),
            row(4, "a", "acme", NOV21 + DAY),
            row(5, "a", "acme", NOV21 + 2 * DAY),
        ];
        let mut index = Index::default();
        let missing = index.missing(&again);
        // acme: the 20th to the 23rd; beta: the 20th and 21st.
        assert_eq!(missing.len(), 6, "{missing:?}");
        for f in &missing {
            index.load(&store, &prefix, f, &[]).await.unwrap();
        }
        assert_eq!(index.len(), 2, "the ids of the one file");
        let (kept, known) = index.retain_new(again.clone());
        assert_eq!(known, 2);
        let kept: Vec<u64> = kept.iter().map(|r| r.0).collect();
        assert_eq!(kept, [2, 3, 5]);

        // Written rows count at once; an excluded file (being rewritten) does not.
        let (groups, _) = crate::sink::group(vec![row(3, "c", "acme", NOV21)]);
        let pending = index.pending(&groups);
        index.commit(pending);
        assert_eq!(index.retain_new(vec![row(9, "c", "acme", NOV21)]).1, 1);
        let mut fresh = Index::default();
        let acme = ("acme".to_string(), day);
        fresh
            .load(&store, &prefix, &acme, &[written.to_string()])
            .await
            .unwrap();
        assert_eq!(fresh.retain_new(vec![row(1, "a", "acme", NOV21)]).1, 0);
    }
}
